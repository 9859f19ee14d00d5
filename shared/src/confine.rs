//! What this machine must give an embedded instance's confinement, checked by kiln before it
//! starts one (exit 2 when missing) and used by the instance's keeper: a cgroup for its limits,
//! and `nft` for the egress policy of a `private` network.
//!
//! Cgroups: the unified hierarchy (v2) when /sys/fs/cgroup is one, else the v1 `pids` and
//! `memory` controllers. Root's instances go under `kiln/`; an ordinary user's under
//! `kiln/user-<uid>/`, which root delegates once (creates it and gives it to the user), as
//! systemd's `Delegate=` does. rlimits are no substitute: RLIMIT_NPROC does not bind root and
//! no rlimit bounds memory, so without a cgroup an instance starts only with
//! `infrastructure.limits: none`.

use std::path::{Path, PathBuf};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 controllers an instance's limits need, with the file each limit is written to.
pub const V1_CONTROLLERS: [(&str, &str); 2] =
    [("pids", "pids.max"), ("memory", "memory.limit_in_bytes")];

/// The nftables program that installs a private network's egress policy.
pub const NFT: &str = "nft";

/// Whether /sys/fs/cgroup is the unified (v2) hierarchy.
pub fn is_cgroup2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").is_file()
}

/// The user id kiln runs as, seen from the machine (not the one of a user namespace kiln
/// re-executed itself in, where it is 0).
pub fn host_uid() -> u32 {
    let euid = crate::userns::euid();
    if !crate::userns::in_child_userns() {
        return euid;
    }
    std::fs::read_to_string("/proc/self/uid_map")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let w: Vec<u32> = l
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                (w.len() == 3 && w[0] <= euid && euid - w[0] < w[2]).then(|| w[1] + (euid - w[0]))
            })
        })
        .unwrap_or(u32::MAX)
}

/// The v1 cgroup of the calling process for `controller`, as /proc/self/cgroup lists it.
fn own_v1_cgroup(controller: &str) -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| "/".into())
}

/// The folders under which this user's instances get their cgroups: one (v2), or one per v1
/// controller. On v1 they nest in kiln's own cgroup, so whatever bounds kiln (a service's
/// limits, a test's guard) bounds its instances too; v2's rule that a cgroup with processes
/// cannot hand controllers to children keeps them at the top (`/sys/fs/cgroup/kiln`).
pub fn cgroup_parents(uid: u32) -> Vec<PathBuf> {
    let under = |base: PathBuf| {
        let base = base.join("kiln");
        if uid == 0 {
            base
        } else {
            base.join(format!("user-{uid}"))
        }
    };
    if is_cgroup2() {
        vec![under(PathBuf::from(CGROUP_ROOT))]
    } else {
        V1_CONTROLLERS
            .iter()
            .map(|(c, _)| {
                let own = own_v1_cgroup(c);
                under(
                    Path::new(CGROUP_ROOT)
                        .join(c)
                        .join(own.trim_start_matches('/')),
                )
            })
            .collect()
    }
}

/// How to give an ordinary user cgroups, for the messages that say none could be made.
fn delegation_hint(uid: u32) -> String {
    if uid == 0 {
        return String::new();
    }
    let dirs: Vec<String> = cgroup_parents(uid)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "; root can delegate them: `mkdir -p {d} && chown -R {uid} {d}`",
        d = dirs.join(" ")
    )
}

/// Whether an instance started now can be put in a cgroup: makes and removes a trial one.
pub fn cgroups_available() -> Result<(), String> {
    let uid = host_uid();
    let trial = format!("trial-{}", std::process::id());
    for parent in cgroup_parents(uid) {
        let attempt = (|| {
            if uid == 0 {
                std::fs::create_dir_all(&parent)?;
            }
            let dir = parent.join(&trial);
            std::fs::create_dir(&dir)?;
            std::fs::remove_dir(&dir)?;
            if uid == 0 {
                remove_parent_if_empty(&dir);
            }
            Ok::<(), std::io::Error>(())
        })();
        if let Err(e) = attempt {
            return Err(format!(
                "infrastructure.limits: this machine gives kiln (uid {uid}) no cgroup for the instance's limits ({}: {e}){}; rlimits bound neither memory nor a root fork bomb, so kiln does not start unbounded instances unless the pipeline says `infrastructure.limits: none`",
                parent.display(),
                delegation_hint(uid)
            ));
        }
    }
    Ok(())
}

/// Removes the `kiln` folder an instance's cgroup `dir` was made in once no instance has one
/// there (it sits in whatever cgroup kiln ran in, which its owner may want to remove); a keeper
/// that makes its cgroup meanwhile makes the folder again.
pub fn remove_parent_if_empty(dir: &Path) {
    if let Some(parent) = dir
        .parent()
        .filter(|p| p.file_name() == Some("kiln".as_ref()))
    {
        let _ = std::fs::remove_dir(parent);
    }
}

/// `name` on PATH, or in the sbin folders an ordinary user's PATH leaves out.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
