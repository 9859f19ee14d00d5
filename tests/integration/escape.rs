//! What a hostile component reaches past the embedded sandbox, tried by a real program inside a
//! real instance: kiln-probe (tests/bin/probe.rs), on an image made of kiln-tiny and the probe.
//! Each refusal is paired with a control where the same call is allowed (a `privileged: true`
//! instance, or the host), so that a refusal cannot come from a missing tool or kernel feature;
//! a seccomp refusal must be EPERM (ENOSYS or EAFNOSUPPORT would be the kernel's, not kiln's).
//!
//! As root, like the other embedded tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;

use crate::embedded::{file_in_tar, top_layer, Home};
use crate::support::{built_binary, repo};

/// The line kiln-probe pushes with TIOCSTI (tests/bin/probe.rs, `INJECTED`), without its newline.
const INJECTED: &str = "#kiln-probe-tiocsti";

/// The probe's `key=value` lines.
pub(crate) type Probe = BTreeMap<String, String>;

pub(crate) fn parse(text: &str) -> Probe {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The image `probe-base` in `home`: kiln-tiny with kiln-probe at /usr/local/bin (kiln-tiny
/// carries the libraries Rust programs load).
pub(crate) fn probe_image(home: &Home) -> &'static str {
    let tar = home.tiny_base_tarball();
    let root = home.path().join("probe-root");
    std::fs::create_dir_all(root.join("usr/local/bin")).expect("root");
    let mut untar = Command::new("tar");
    untar.arg("-xpf").arg(&tar).arg("-C").arg(&root);
    crate::support::run_ok(untar);
    let probe = root.join("usr/local/bin/kiln-probe");
    std::fs::copy(built_binary("kiln-probe"), &probe).expect("copy kiln-probe");
    let (code, out, err) =
        home.kiln(&["image", "import", "probe-base", &root.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::remove_dir_all(&root).expect("remove the probe's root");
    "probe-base"
}

/// The probe's pipeline on `parent`, named `name`, `privileged` or not.
pub(crate) fn pipeline(home: &Home, parent: &str, name: &str, privileged: bool) -> PathBuf {
    let dir = repo().join("tests/data/escape");
    let text = std::fs::read_to_string(dir.join("pipeline.yaml"))
        .expect("pipeline")
        .replace("@PARENT@", parent)
        .replace("name: escape", &format!("name: {name}"))
        .replace("privileged: false", &format!("privileged: {privileged}"))
        .replace(
            "components/probe.yaml",
            &dir.join("components/probe.yaml").display().to_string(),
        );
    let path = home.path().join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("write");
    path
}

/// The probe's report in the image a finished build made.
pub(crate) fn report(home: &Home, summary: &Json) -> Probe {
    let id = summary["images"]["us-east-1"].as_str().expect("image");
    let tar = home.path().join(format!("{id}-layer.tar"));
    top_layer(&home.layout("us-east-1").dir, id, &tar);
    let probe = parse(&file_in_tar(&tar, "var/lib/probe.txt"));
    assert!(probe.contains_key("socket_vsock"), "no report: {probe:?}");
    probe
}

/// `command` (bash) run by `script` in a new pty that is its controlling terminal, as in an
/// operator's shell; afterwards the same shell reads what the terminal holds for it, as the
/// operator's shell would once kiln returns. Returns everything the terminal showed.
fn in_a_terminal(command: &str) -> String {
    let reader = format!(
        "{command}; echo \"exit:$?\"; \
         while read -r -t 3 line; do echo \"GOT:[$line]\"; done; echo \"PARTIAL:[$line]\""
    );
    let mut child = Command::new("script")
        .args(["-qfec", &reader, "/dev/null"])
        .env("SHELL", "/bin/bash")
        .env_remove("KILN_AGENT")
        .env_remove("KILN_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    // Held open until script ends: at the end of its input script would end the terminal's.
    let _input = child.stdin.take();
    let out = child.wait_with_output().expect("script");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        text.contains("PARTIAL:["),
        "the shell in the terminal did not finish: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `kiln run` of `pipeline` for `home` in a terminal: the summary and what the terminal showed.
fn kiln_in_a_terminal(home: &Home, pipeline: &Path) -> (Json, String) {
    let summary = home.path().join("summary.json");
    let err = home.path().join("kiln.err");
    let text = in_a_terminal(&format!(
        "'{}' --home '{}' run '{}' --output json > '{}' 2> '{}'",
        built_binary("kiln").display(),
        home.path().display(),
        pipeline.display(),
        summary.display(),
        err.display()
    ));
    let err = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(text.contains("exit:0"), "{text}\n{err}");
    let summary: Json = serde_json::from_slice(&std::fs::read(&summary).expect("summary"))
        .unwrap_or_else(|e| panic!("summary ({e}): {err}"));
    (summary, text)
}

/// What the terminal handed its shell after the command: lines, then a partial line.
fn typed_into(terminal: &str) -> Vec<&str> {
    terminal
        .lines()
        .filter_map(|l| l.strip_prefix("GOT:[").or(l.strip_prefix("PARTIAL:[")))
        .map(|l| l.trim_end_matches(']'))
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn a_component_cannot_type_into_the_operators_terminal() {
    // GIVEN the probe, which pushes `#kiln-probe-tiocsti` with TIOCSTI into /dev/tty and its
    // stdin, stdout and stderr, run by an operator's shell in a terminal of its own
    let home = Home::new();
    let parent = probe_image(&home);
    let scratch = tempfile::tempdir().expect("scratch");
    let host_report = scratch.path().join("host.txt");
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let host_terminal = in_a_terminal(&format!(
        "'{}' --pid {} > '{}'",
        built_binary("kiln-probe").display(),
        sleeper.id(),
        host_report.display()
    ));
    let host = parse(&std::fs::read_to_string(&host_report).expect("host report"));
    // THEN on the host (as root, whom dev.tty.legacy_tiocsti=0 would not stop either) the line
    // reaches the shell: the terminal and the reader tell an injection when there is one
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti").unwrap_or_default();
    assert_eq!(
        host["tiocsti_dev_tty"], "OK(20)",
        "legacy_tiocsti={legacy} {host:?}"
    );
    assert!(
        typed_into(&host_terminal).contains(&INJECTED),
        "{host_terminal}"
    );
    assert_ne!(host["tty_nr"], "0", "{host:?}");

    // WHEN a build's component runs the same probe, kiln run in the same kind of terminal
    let (summary, terminal) = kiln_in_a_terminal(&home, &pipeline(&home, parent, "escape", false));
    let inside = report(&home, &summary);
    eprintln!("probe inside: {inside:?}\nterminal: {terminal}");
    // THEN nothing reaches the shell after kiln returns, not even echoed
    assert!(typed_into(&terminal).is_empty(), "{terminal}");
    assert!(!terminal.contains(INJECTED), "{terminal}");
    // AND the component had no controlling terminal, in a session of its own within the
    // instance (0: the leader is outside its PID namespace, as kiln's session is)
    assert_eq!(inside["tty_nr"], "0", "{inside:?}");
    assert_ne!(inside["sid"], "0", "{inside:?}");
    // AND there is no /dev/tty to open
    assert_eq!(inside["dev_tty_open"], "ERR(ENOENT)", "{inside:?}");
    // AND seccomp refuses TIOCSTI and TIOCLINUX on any descriptor, also on a terminal the
    // process controls (where the kernel would allow it), also with the request's high bits set
    for key in [
        "tiocsti_fd0",
        "tiocsti_fd1",
        "tiocsti_fd2",
        "tiocsti_dev_tty",
        "tioclinux_fd0",
        "tiocsti_own_pty",
        "tiocsti_own_pty_high",
        "tioclinux_own_pty",
    ] {
        assert_eq!(inside[key], "ERR(EPERM)", "{key}: {inside:?}");
    }
    home.assert_nothing_left("escape");

    // AND a `privileged: true` instance (no seccomp filter, CAP_SYS_ADMIN) reaches its own
    // terminal with the same calls, but kiln's no more than before
    let (summary, terminal) =
        kiln_in_a_terminal(&home, &pipeline(&home, parent, "escape-open", true));
    let open = report(&home, &summary);
    assert_eq!(open["tiocsti_own_pty"], "OK(20)", "{open:?}");
    assert_eq!(open["tiocsti_own_pty_high"], "OK(20)", "{open:?}");
    assert_ne!(open["tioclinux_own_pty"], "ERR(EPERM)", "{open:?}");
    assert_eq!(open["tty_nr"], "0", "{open:?}");
    assert_eq!(open["dev_tty_open"], "ERR(ENOENT)", "{open:?}");
    assert!(typed_into(&terminal).is_empty(), "{terminal}");
    assert!(!terminal.contains(INJECTED), "{terminal}");
    home.assert_nothing_left("escape-open");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// The probe's report from an unprivileged and a `privileged: true` build in one home.
fn probe_both() -> (Home, Probe, Probe) {
    let home = Home::new();
    let parent = probe_image(&home);
    let run = |name: &str, privileged: bool| {
        let (code, summary, err) = home.run(&pipeline(&home, parent, name, privileged));
        assert_eq!(code, 0, "{summary}\n{err}");
        let probe = report(&home, &summary);
        home.assert_nothing_left(name);
        probe
    };
    let closed = run("escape", false);
    let open = run("escape-open", true);
    (home, closed, open)
}

#[test]
fn keyrings_and_vsock_are_refused_with_eperm_inside_and_work_where_allowed() {
    // GIVEN the probe in an instance, and in a `privileged: true` one
    let (_home, closed, open) = probe_both();
    // THEN the keyring calls and a vsock socket fail with EPERM: seccomp's refusal, not a
    // kernel without the feature
    for key in [
        "keyctl_user_keyring",
        "add_key",
        "request_key",
        "socket_vsock",
    ] {
        assert_eq!(closed[key], "ERR(EPERM)", "{key}: {closed:?}");
    }
    // AND where they are allowed the kernel answers them: a keyring's serial, a new key, "no
    // such key", a vsock socket (this machine has vsock)
    assert!(open["keyctl_user_keyring"].starts_with("OK("), "{open:?}");
    assert!(open["add_key"].starts_with("OK("), "{open:?}");
    assert_eq!(open["request_key"], "ERR(ENOKEY)", "{open:?}");
    assert!(open["socket_vsock"].starts_with("OK("), "{open:?}");
}

#[test]
fn init_is_out_of_reach_and_dockers_masked_paths_are_masked() {
    // GIVEN the probe in an instance, and in a `privileged: true` one
    let (_home, closed, open) = probe_both();
    // THEN init's program and handles cannot be read or opened, nor init traced
    for key in [
        "pid1_exe_readlink",
        "pid1_exe_open",
        "pid1_fd1_readlink",
        "pid1_fd1_open",
    ] {
        assert_eq!(closed[key], "ERR(EACCES)", "{key}: {closed:?}");
    }
    assert_eq!(closed["ptrace_seize_pid1"], "ERR(EPERM)", "{closed:?}");
    // AND with CAP_SYS_PTRACE they can: init runs from the read-only agent folder, not from a
    // program of the host's
    assert_eq!(
        open["pid1_exe_readlink"], "OK(/.kiln/kiln-agent)",
        "{open:?}"
    );
    assert_eq!(open["pid1_exe_open"], "OK(opened)", "{open:?}");
    assert!(open["pid1_fd1_readlink"].starts_with("OK("), "{open:?}");
    assert_eq!(open["ptrace_seize_pid1"], "OK(0)", "{open:?}");
    // AND every path of Docker's and podman's masked list that this machine has is masked,
    // and open in the privileged instance; their read-only paths are read-only
    let mut checked = Vec::new();
    let mut absent = Vec::new();
    for (key, value) in &closed {
        let Some(path) = key.strip_prefix("masked:") else {
            continue;
        };
        if !Path::new(path).exists() {
            absent.push(path);
            continue;
        }
        assert_eq!(value, "masked", "{path}: {closed:?}");
        assert_eq!(open[key], "open", "{path} (privileged): {open:?}");
        checked.push(path);
    }
    // (Not a list this machine could leave empty: every Linux has these two.)
    for must in ["/proc/interrupts", "/proc/timer_list"] {
        assert!(checked.contains(&must), "{must} not checked: {checked:?}");
    }
    eprintln!("masked paths checked: {checked:?}; absent on this machine: {absent:?}");
    for (key, value) in &closed {
        let Some(path) = key.strip_prefix("readonly:") else {
            continue;
        };
        if Path::new(path).exists() {
            assert_eq!(value, "ro", "{path}: {closed:?}");
        }
    }
    assert_eq!(open["readonly:/proc/sys"], "rw", "{open:?}");
}
