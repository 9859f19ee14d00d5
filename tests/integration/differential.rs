//! kiln against the field's reference: the same kiln-probe (tests/bin/probe.rs), on the same
//! root file system (kiln-tiny and the probe), inside a kiln instance (`privileged: false`,
//! `network: none`) and inside `podman run --network none` with podman's default posture
//! (rootful). Every line the probe prints is judged: what podman refuses kiln must refuse, with
//! EPERM or EACCES (ENOSYS or EAFNOSUPPORT could be the kernel's); capability masks must be
//! subsets of podman's; a path podman masks or makes read-only must be so; a device node must be
//! one podman gives too. The probe on the host is the control: there the calls reach the kernel,
//! so a refusal inside cannot come from a broken probe.
//!
//! As root, like the other embedded tests. Needs podman and runc (the Makefile installs them).

use std::collections::BTreeSet;
use std::process::Command;

use crate::embedded::Home;
use crate::escape::{parse, pipeline, probe_image, report, Probe};
use crate::support::built_binary;

/// How one line compares.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Podman refuses or hides it, and so does kiln.
    Closed,
    /// Podman lets it through: kiln may or may not.
    PodmanOpen,
    /// Facts that are no permission (the session's id).
    Info,
    /// Podman refuses or hides it and kiln does not: a finding.
    MoreOpen,
}

/// The refusals that can only be a policy's (seccomp's or a capability check's).
fn refused(value: &str) -> bool {
    value == "ERR(EPERM)" || value == "ERR(EACCES)"
}

/// Podman refused the call: EPERM/EACCES, or ENOSYS/EAFNOSUPPORT (podman's seccomp answers
/// some calls so) where the host's kernel answered otherwise.
fn podman_refused(podman: &str, host: Option<&String>) -> bool {
    refused(podman)
        || (matches!(podman, "ERR(ENOSYS)" | "ERR(EAFNOSUPPORT)")
            && host.is_some_and(|h| h != podman))
}

fn mask(hex: &str) -> u64 {
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("capability mask {hex}: {e}"))
}

fn verdict(
    key: &str,
    podman: Option<&String>,
    kiln: Option<&String>,
    host: Option<&String>,
) -> Verdict {
    if matches!(key, "sid" | "tty_nr") {
        return Verdict::Info;
    }
    if key.starts_with("dev:") {
        return match (podman, kiln) {
            (_, None) => Verdict::Closed,
            (Some(p), Some(k)) if p == k => Verdict::PodmanOpen,
            _ => Verdict::MoreOpen,
        };
    }
    let (Some(p), Some(k)) = (podman, kiln) else {
        // Only thermal_throttle folders are listed per machine; both runs share it.
        return Verdict::MoreOpen;
    };
    if key.starts_with("status:Cap") {
        return if mask(k) & !mask(p) == 0 {
            Verdict::Closed
        } else {
            Verdict::MoreOpen
        };
    }
    if matches!(key, "status:NoNewPrivs" | "status:Seccomp") {
        let n = |v: &str| v.parse::<u32>().expect("a number");
        return if n(k) >= n(p) {
            Verdict::Closed
        } else {
            Verdict::MoreOpen
        };
    }
    if key.starts_with("masked:") {
        return match (p.as_str(), k.as_str()) {
            ("masked", "masked" | "absent") => Verdict::Closed,
            ("masked", _) => Verdict::MoreOpen,
            _ => Verdict::PodmanOpen,
        };
    }
    if key.starts_with("readonly:") {
        return match (p.as_str(), k.as_str()) {
            ("ro", "ro" | "absent") => Verdict::Closed,
            ("ro", _) => Verdict::MoreOpen,
            _ => Verdict::PodmanOpen,
        };
    }
    if podman_refused(p, host) {
        if refused(k) {
            Verdict::Closed
        } else {
            Verdict::MoreOpen
        }
    } else {
        Verdict::PodmanOpen
    }
}

/// The probe in `podman run --rm --network none --rootfs ROOT`, rootful, podman's defaults
/// otherwise. Two departures this machine needs, neither part of the posture compared: runc
/// (Debian's crun refuses hybrid cgroup hierarchies) and file and process limits no higher than
/// the caller's (root here lacks CAP_SYS_RESOURCE to raise them to podman's defaults).
fn podman_probe(root: &std::path::Path) -> Probe {
    let out = Command::new("podman")
        .args(["--runtime", "runc", "run", "--rm", "--network", "none"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .arg("--rootfs")
        .arg(root)
        .arg("/usr/local/bin/kiln-probe")
        .output()
        .expect("podman (the Makefile installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "podman: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&text)
}

/// The probe on the host, as root outside any container; `pid1_*` keys probe a sleeper.
fn host_probe() -> Probe {
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let out = Command::new(built_binary("kiln-probe"))
        .args(["--pid", &sleeper.id().to_string()])
        .output()
        .expect("kiln-probe");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(out.status.success());
    parse(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn differential_kiln_is_at_least_as_closed_as_podman() {
    // GIVEN kiln-tiny with kiln-probe, as a root file system for podman and as kiln's image
    let home = Home::new();
    let root = home.path().join("podman-root");
    std::fs::create_dir_all(root.join("usr/local/bin")).expect("root");
    let mut untar = Command::new("tar");
    untar
        .arg("-xpf")
        .arg(home.tiny_base_tarball())
        .arg("-C")
        .arg(&root);
    crate::support::run_ok(untar);
    std::fs::copy(
        built_binary("kiln-probe"),
        root.join("usr/local/bin/kiln-probe"),
    )
    .expect("copy kiln-probe");
    let parent = probe_image(&home);

    // WHEN the probe runs on the host, in podman, and in a kiln instance
    let host = host_probe();
    let podman = podman_probe(&root);
    let (code, summary, err) = home.run(&pipeline(&home, parent, "differential", false));
    assert_eq!(code, 0, "{summary}\n{err}");
    let kiln = report(&home, &summary);
    home.assert_nothing_left("differential");

    // THEN on the host the calls reach the kernel: a policy refuses none of them, so a refusal
    // in a container is the container's
    for key in [
        "keyctl_user_keyring",
        "add_key",
        "socket_af_1",
        "socket_af_2",
        "socket_af_16",
        "socket_af_17",
        "socket_af_40",
        "sys_unshare_newns_newuser",
        "sys_syslog",
        "sys_userfaultfd",
        "ptrace_seize_pid1",
    ] {
        assert!(host[key].starts_with("OK("), "host {key}: {host:?}");
    }
    assert_eq!(host["status:Seccomp"], "0", "{host:?}");
    // (EINVAL: past the capability check, stopped by the wrong magic.)
    assert_eq!(host["sys_reboot"], "ERR(EINVAL)", "{host:?}");

    // AND the table: every line of either run, judged
    let keys: BTreeSet<&String> = podman.keys().chain(kiln.keys()).collect();
    let none = "-".to_string();
    let mut table = String::from("key | podman | kiln | verdict\n");
    let mut more_open = Vec::new();
    let mut podman_refusals = 0;
    for key in keys {
        let v = verdict(key, podman.get(key), kiln.get(key), host.get(key));
        table.push_str(&format!(
            "{key} | {} | {} | {v:?}\n",
            podman.get(key).unwrap_or(&none),
            kiln.get(key).unwrap_or(&none)
        ));
        if let Some(p) = podman.get(key) {
            if podman_refused(p, host.get(key)) {
                podman_refusals += 1;
                // A refusal podman makes is podman's: the host's kernel answered otherwise.
                assert_ne!(host.get(key), Some(p), "{key}: the host refuses it too");
            }
        }
        if v == Verdict::MoreOpen {
            more_open.push(key.clone());
        }
    }
    eprintln!("{table}");
    // (Not a comparison podman could leave empty: its seccomp profile refuses these calls.)
    assert!(podman_refusals >= 20, "{podman_refusals} refusals: {table}");
    assert!(podman["status:CapBnd"] != host["status:CapBnd"], "{table}");
    // AND kiln is nowhere more open than podman
    assert!(
        more_open.is_empty(),
        "kiln more open than podman: {more_open:?}"
    );
}
