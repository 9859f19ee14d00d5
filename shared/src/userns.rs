//! An ordinary user's kiln, as rootless podman runs: where the user has subordinate ids
//! (`/etc/subuid` and `/etc/subgid`, with `newuidmap`/`newgidmap` from Debian's `uidmap`), the
//! `kiln` process re-executes itself in a user namespace where the user is root and ids 1–65535
//! are the user's subordinate ones (`unshare --user --map-auto --map-root-user`). Everything kiln
//! does with files of images and instances then happens in that namespace: layers unpack with
//! their owners, snapshots read what the instance's users wrote, and clean-up removes it — files
//! the user could not touch from outside. Without subordinate ids, kiln stays outside and each
//! instance's keeper makes a namespace with the single mapping (user = root, nothing else).

use std::path::{Path, PathBuf};

/// Set in the environment of a kiln that runs in its own user namespace (so it does not
/// re-execute again).
pub const MARKER: &str = "KILN_USERNS";

fn status_ids(field: &str) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|w| w.parse().ok())
            .collect(),
    )
}

/// The effective user id, as the current user namespace sees it.
pub fn euid() -> u32 {
    status_ids("Uid:")
        .and_then(|ids| ids.get(1).copied())
        .unwrap_or(u32::MAX)
}

/// Whether this process is in a user namespace other than the machine's own.
pub fn in_child_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| {
            let first: Vec<&str> = m.split_whitespace().take(3).collect();
            first != ["0", "0", "4294967295"]
        })
        .unwrap_or(false)
}

/// Whether the machine's root privileges are out of reach: an ordinary user, or root of a user
/// namespace (which may own files of its mapped ids, but not make devices or set `trusted.*`).
pub fn unprivileged() -> bool {
    euid() != 0 || in_child_userns()
}

/// A subordinate id range, as `/etc/subuid` or `/etc/subgid` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub count: u64,
}

/// The first range `file` gives the user `name` (or `id`).
pub fn subordinate(file: &str, name: &str, id: u32) -> Option<Range> {
    let id = id.to_string();
    file.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let (owner, start, count) = (parts.next()?, parts.next()?, parts.next()?);
        (owner == name || owner == id)
            .then(|| {
                Some(Range {
                    start: start.parse().ok()?,
                    count: count.parse().ok()?,
                })
            })
            .flatten()
            .filter(|r| r.count > 0)
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?;
        (id == uid.to_string()).then(|| name.to_string())
    })
}

/// The command that re-executes `program` with `args` in a user namespace with the user's
/// subordinate ids, when this ordinary user has them and is not in such a namespace already.
pub fn reexec(program: &Path, args: &[std::ffi::OsString]) -> Option<std::process::Command> {
    if euid() == 0 || in_child_userns() || std::env::var_os(MARKER).is_some() {
        return None;
    }
    let uid = euid();
    let name = user_name(uid).unwrap_or_default();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    // Both files list the user (by name or id), as newuidmap and newgidmap look them up.
    subordinate(&read("/etc/subuid"), &name, uid)?;
    subordinate(&read("/etc/subgid"), &name, uid)?;
    let unshare = on_path("unshare")?;
    on_path("newuidmap")?;
    on_path("newgidmap")?;
    let flags = ["--user", "--map-auto", "--map-root-user"];
    // newuidmap may still refuse (not setuid, a range that overlaps): then kiln stays outside.
    let works = std::process::Command::new(&unshare)
        .args(flags)
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        return None;
    }
    let mut c = std::process::Command::new(unshare);
    c.args(flags)
        .arg("--")
        .arg(program)
        .args(args)
        .env(MARKER, "1");
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_found_by_name_or_id() {
        let file = "alice:100000:65536\n1001:165536:65536\nbob:0:0\n";
        assert_eq!(
            subordinate(file, "alice", 1000),
            Some(Range {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            subordinate(file, "carol", 1001).map(|r| r.start),
            Some(165536)
        );
        assert_eq!(subordinate(file, "bob", 1002), None, "an empty range");
        assert_eq!(subordinate(file, "dave", 1003), None);
    }
}
