//! `network: private`: an instance's own network namespace, reaching out through slirp4netns —
//! user-mode networking, as rootless podman gives its containers. The instance sees a `tap0`
//! with 10.0.2.100/24, a gateway at 10.0.2.2 and a DNS forwarder at 10.0.2.3; slirp4netns
//! turns its connections into sockets of the host's network stack, opened by an ordinary
//! process. Nothing reaches in, the host's interfaces are not in the namespace, and the host's
//! loopback is out of reach (`--disable-host-loopback`).
//!
//! slirp4netns must live in the host's network namespace and join the instance's, so the keeper
//! starts it (through `kiln-agent sandbox usernet`, which waits on its stdin) before it
//! unshares anything and lets it go once the namespace exists. It runs in its own sandbox
//! (`--enable-sandbox`: a mount namespace of its own, capabilities dropped) under its own
//! seccomp filter, and ends when the keeper does: its `--exit-fd` is the read end of a pipe
//! whose write end only the keeper holds.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{pipe2, read, write};

/// The program, found on PATH.
pub const PROGRAM: &str = "slirp4netns";
/// The DNS forwarder slirp4netns answers at inside the namespace.
pub const NAMESERVER: &str = "10.0.2.3";
/// How long slirp4netns may take to set the namespace up.
const READY_WITHIN_MS: u16 = 10_000;

/// slirp4netns started and waiting for the keeper's network namespace.
#[derive(Debug)]
pub struct Waiting {
    /// One byte lets it go; closing it (the keeper's end) ends it.
    go: OwnedFd,
    ready: OwnedFd,
    child: Child,
}

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("user-mode networking: {what}: {e}")
}

/// Starts slirp4netns for the network namespace the calling process (the keeper) is about to
/// create; it waits until `Waiting::start`.
pub fn prepare() -> Result<Waiting, String> {
    // Close-on-exec: the keeper's ends must reach neither the helper nor the instance (a copy
    // of the exit pipe's write end elsewhere would keep slirp4netns alive).
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e))?;
    let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e))?;
    let exe = std::env::current_exe().map_err(|e| fail("find kiln-agent", e))?;
    let child = Command::new(exe)
        .args(["sandbox", "usernet", "--target"])
        .arg(std::process::id().to_string())
        .stdin(Stdio::from(go_r))
        .stdout(Stdio::from(ready_w))
        .spawn()
        .map_err(|e| fail("start the helper", e))?;
    Ok(Waiting {
        go: go_w,
        ready: ready_r,
        child,
    })
}

/// `kiln-agent sandbox usernet`: waits for a byte on stdin, then becomes slirp4netns for the
/// network namespace of `target`, with stdin as its exit fd and what was stdout as its ready fd.
pub fn helper(target: u32) -> Result<i32, String> {
    let mut byte = [0u8; 1];
    match std::io::stdin().read(&mut byte) {
        Ok(1) => {}
        // The keeper ended without creating the namespace.
        _ => return Ok(0),
    }
    let ready = nix::unistd::dup(std::io::stdout().as_fd()).map_err(|e| fail("dup", e))?;
    // What slirp4netns prints goes to the keeper's log, not into the ready pipe.
    nix::unistd::dup2_stdout(std::io::stderr().as_fd()).map_err(|e| fail("dup2", e))?;
    let e = Command::new(PROGRAM)
        .args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            "--exit-fd=0",
        ])
        .arg(format!("--ready-fd={}", ready.as_raw_fd()))
        .arg(target.to_string())
        .arg("tap0")
        .exec();
    Err(fail(&format!("start {PROGRAM}"), e))
}

impl Waiting {
    /// Lets slirp4netns join the namespace that now exists and waits until it has configured
    /// `tap0`. slirp4netns ends when the calling process does.
    pub fn start(self) -> Result<(), String> {
        let Waiting {
            go,
            ready,
            mut child,
        } = self;
        write(&go, b"g").map_err(|e| fail("release slirp4netns", e))?;
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(READY_WITHIN_MS))
            .map_err(|e| fail("wait for slirp4netns", e))?;
        if n == 0 {
            let _ = child.kill();
            return Err(fail(
                "slirp4netns",
                format!("not ready within {} s", READY_WITHIN_MS / 1000),
            ));
        }
        let mut byte = [0u8; 1];
        if !matches!(read(&ready, &mut byte), Ok(1) if byte[0] == b'1') {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(fail(
                "slirp4netns",
                format!("it ended ({status}) before the network was up; its messages are above"),
            ));
        }
        // The keeper's end stays open while the keeper lives; when it closes, slirp4netns ends.
        std::mem::forget(go);
        Ok(())
    }
}

/// The instance's `/etc/resolv.conf` under `network: private`: slirp4netns's forwarder, with
/// the host's search domains and options.
pub fn resolv_conf(host: &str) -> String {
    let mut text = format!("nameserver {NAMESERVER}\n");
    for line in host.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if matches!(word, "search" | "domain" | "options") {
            text.push_str(line.trim());
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_search_and_options_and_names_the_forwarder() {
        let host =
            "# generated\nnameserver 127.0.0.53\nsearch corp.example\noptions edns0 trust-ad\n";
        assert_eq!(
            resolv_conf(host),
            "nameserver 10.0.2.3\nsearch corp.example\noptions edns0 trust-ad\n"
        );
    }
}
