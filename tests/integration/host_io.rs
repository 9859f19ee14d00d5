//! What the host keeps of the embedded cloud, as root: a home nobody else can reach (setuid files
//! and layers included), device entries that never become host nodes, a home of another user
//! refused, and bounded reads of what an instance writes (issue 27, review findings H-1, M-7 and
//! H-3).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::embedded::{raw_query, Home};
use crate::support::{built_binary, repo, run_ok};

/// The ordinary user the probes run as (`nobody`).
const NOBODY: u32 = 65534;

/// Every entry under `root` (links not followed), `root` included.
fn entries(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            todo.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        out.push((p, m));
    }
    out
}

/// Runs `script` by sh as `uid` with `paths` as its arguments; what it printed.
fn sh_as(uid: u32, script: &str, paths: &[PathBuf]) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(paths)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The paths of `paths` that `uid` can `stat` (as `test -e` or `test -L` does).
fn reachable_by(uid: u32, paths: &[PathBuf]) -> Vec<String> {
    sh_as(
        uid,
        r#"for f; do if [ -e "$f" ] || [ -L "$f" ]; then echo "$f"; fi; done"#,
        paths,
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// The regular files of `paths` that `uid` can open and read.
fn readable_by(uid: u32, paths: &[PathBuf]) -> Vec<String> {
    sh_as(
        uid,
        r#"for f; do if cat -- "$f" > /dev/null 2>&1; then echo "$f"; fi; done"#,
        paths,
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Whether `uid` can execute `program` (it is `true`: it exits 0 when it runs).
fn runs_as(uid: u32, program: &Path) -> bool {
    Command::new(program)
        .uid(uid)
        .gid(uid)
        .status()
        .is_ok_and(|s| s.success())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").mode() & 0o7777
}

/// The owners pipeline (a component that makes `/usr/local/bin/suid-true` mode 4755, and a test
/// instance that unpacks the image's layers), on kiln-tiny, in the home region only.
fn setuid_pipeline(dir: &Path) -> PathBuf {
    let data = repo().join("tests/data/embedded/owners");
    let text = std::fs::read_to_string(data.join("pipeline.yaml"))
        .expect("pipeline")
        .replace("  - region: eu-west-1\n", "")
        .replace(
            "distribution:",
            "infrastructure:\n  network: none\ndistribution:",
        )
        .replace(
            "components/owners.yaml",
            &data.join("components/owners.yaml").display().to_string(),
        );
    let path = dir.join("setuid.yaml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn nothing_under_a_root_home_is_reachable_by_another_user_setuid_files_and_layers_included() {
    // GIVEN a root home where a component made a setuid-root program, kept in the image's layer
    // and unpacked for the test instance
    let home = Home::new();
    let scratch = tempfile::tempdir().expect("scratch");
    let (code, summary, err) = home.run(&setuid_pipeline(scratch.path()));
    assert_eq!(code, 0, "{summary}\n{err}");
    let all = entries(home.path());
    let setuid: Vec<PathBuf> = all
        .iter()
        .filter(|(_, m)| m.is_file() && m.mode() & 0o4000 != 0)
        .map(|(p, _)| p.clone())
        .collect();
    assert!(
        setuid
            .iter()
            .any(|p| p.starts_with(home.path().join("layers"))
                && p.ends_with("usr/local/bin/suid-true")),
        "the component's setuid file is in an unpacked layer: {setuid:?}"
    );
    let files: Vec<PathBuf> = all
        .iter()
        .filter(|(_, m)| m.is_file())
        .map(|(p, _)| p.clone())
        .collect();
    let paths: Vec<PathBuf> = all.iter().map(|(p, _)| p.clone()).collect();
    // WHEN uid 65534 stats every entry, reads every file and runs the setuid program
    // THEN nothing below the home can be reached, read or run
    let below: Vec<PathBuf> = paths[..]
        .iter()
        .filter(|p| *p != home.path())
        .cloned()
        .collect();
    assert_eq!(reachable_by(NOBODY, &below), Vec::<String>::new());
    assert_eq!(readable_by(NOBODY, &files), Vec::<String>::new());
    // (`suid-true` is the host's `true`: it exits 0 whenever it runs)
    let programs: Vec<&PathBuf> = setuid
        .iter()
        .filter(|p| p.ends_with("usr/local/bin/suid-true"))
        .collect();
    for program in &programs {
        assert!(!runs_as(NOBODY, program), "{} ran", program.display());
    }
    // AND as root the same probes reach all of it (they are not refused for another reason)
    assert_eq!(reachable_by(0, &below).len(), below.len());
    assert!(readable_by(0, &files).len() >= files.len() - 1);
    assert!(programs.iter().all(|p| runs_as(0, p)));
    // AND the same program copied to a folder anyone may enter runs as uid 65534, setuid bit kept
    let open = tempfile::Builder::new()
        .prefix("kiln-open-")
        .tempdir()
        .expect("open");
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = open.path().join("suid-true");
    std::fs::copy(programs[0], &copy).expect("copy");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    assert!(runs_as(NOBODY, &copy), "the copy runs for uid 65534");
    // AND the home and kiln's folders in it are private, the store too
    assert_eq!(mode(home.path()), 0o700);
    for sub in [
        "regions",
        "instances",
        "layers",
        "layers/sha256",
        "tokens",
        "runs",
    ] {
        assert_eq!(mode(&home.path().join(sub)), 0o700, "{sub}");
    }
    for db in ["state.db", "state.db-wal", "state.db-shm"] {
        let p = home.path().join(db);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{db}");
        }
    }
    home.assert_nothing_left("owners");
}

#[test]
fn an_imported_block_device_stays_in_the_image_and_never_becomes_a_host_node() {
    // GIVEN kiln-tiny as a tarball with a block device entry for the host's first disk, mode 0666
    let home = Home::new();
    let base = home.tiny_base_tarball();
    let scratch = tempfile::tempdir().expect("scratch");
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let mut untar = Command::new("tar");
    untar
        .args(["--numeric-owner", "-xpf"])
        .arg(&base)
        .arg("-C")
        .arg(&root);
    run_ok(untar);
    std::fs::create_dir_all(root.join("x")).expect("x");
    let mut mknod = Command::new("mknod");
    mknod
        .args(["-m", "0666"])
        .arg(root.join("x/hostdisk"))
        .args(["b", "8", "0"]);
    run_ok(mknod);
    let tarball = scratch.path().join("with-disk.tar");
    let mut tar = Command::new("tar");
    tar.args(["--numeric-owner", "-cf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&root)
        .arg(".");
    run_ok(tar);
    // WHEN kiln imports it, and exports the image again
    let (code, out, err) = home.kiln(&[
        "image",
        "import",
        "with-disk",
        &tarball.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let id = out.split('\t').nth(1).expect("id").to_string();
    let exported = scratch.path().join("exported.tar");
    let (code, out, err) = home.kiln(&["image", "export", &id, &exported.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    // THEN no device node is anywhere under the home (overlay whiteouts, 0/0, are no devices)
    let nodes: Vec<String> = entries(home.path())
        .into_iter()
        .filter(|(_, m)| {
            let t = m.file_type();
            t.is_block_device() || (t.is_char_device() && m.rdev() != 0)
        })
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert_eq!(nodes, Vec::<String>::new());
    // AND the image still holds the entry: the exported root file system lists the device
    let list = run_ok({
        let mut c = Command::new("tar");
        c.args(["--numeric-owner", "-tvf"]).arg(&exported);
        c
    });
    let line = list
        .lines()
        .find(|l| l.ends_with("x/hostdisk"))
        .unwrap_or_else(|| panic!("no x/hostdisk in the export:\n{list}"));
    assert!(
        line.starts_with("brw-rw-rw-") && line.contains("8,0"),
        "{line}"
    );
}

/// `kiln ARGS` as root on `home` (which may not exist yet).
fn kiln_on(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(built_binary("kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("KILN_AGENT")
        .env_remove("KILN_HOME")
        .output()
        .expect("kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn root_refuses_a_home_another_user_owns_with_exit_2_at_every_entry_point() {
    // GIVEN a home owned by uid 65534 (left open, as a shared folder would be)
    let scratch = tempfile::tempdir().expect("scratch");
    let home = scratch.path().join("theirs");
    std::fs::create_dir(&home).expect("home");
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let pipeline = repo().join("tests/data/embedded/breaks-build/pipeline.yaml");
    let pipeline = pipeline.display().to_string();
    let dir = home.display().to_string();
    for args in [
        vec!["run", pipeline.as_str()],
        vec!["serve", "--list"],
        vec!["gc"],
        vec!["image", "list"],
        vec!["image", "bootstrap", "base", "--variant", "tiny"],
        vec!["builds", "list"],
        vec!["apply", pipeline.as_str()],
    ] {
        // WHEN root runs kiln on it
        let (code, out, err) = kiln_on(&home, &args);
        // THEN kiln refuses, names the owner and what to run, and creates nothing there
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("belongs to uid 65534") && err.contains(&format!("chmod 700 {dir}")),
            "{args:?}: {err}"
        );
        assert_eq!(
            std::fs::read_dir(&home).expect("home").count(),
            0,
            "{args:?} created something"
        );
    }
    // AND the same home, once root's, is used (the refusal is the owner, not the command)
    std::os::unix::fs::chown(&home, Some(0), Some(0)).expect("chown");
    let (code, out, err) = kiln_on(&home, &["image", "list"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn new_homes_are_private_and_a_looser_home_of_ones_own_is_tightened() {
    let scratch = tempfile::tempdir().expect("scratch");
    // GIVEN no home yet WHEN kiln makes one THEN it and its folders are 0700, the store 0600
    let fresh = scratch.path().join("a/new/home");
    let (code, out, err) = kiln_on(&fresh, &["image", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&fresh), 0o700);
    for sub in [
        "regions",
        "instances",
        "layers",
        "layers/sha256",
        "layers/tmp",
        "tokens",
    ] {
        assert_eq!(mode(&fresh.join(sub)), 0o700, "{sub}");
    }
    for db in ["state.db", "state.db-wal", "state.db-shm"] {
        let p = fresh.join(db);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{db}");
        }
    }
    assert_eq!(mode(&fresh.join("state.db")), 0o600);
    // GIVEN a home of root's made by an older kiln: 0755 folders, a 0644 store
    let old = scratch.path().join("old");
    let (code, _, err) = kiln_on(&old, &["image", "list"]);
    assert_eq!(code, 0, "{err}");
    for p in [old.clone(), old.join("layers"), old.join("instances")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(old.join("state.db"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    // WHEN kiln opens it THEN it is tightened
    let (code, out, err) = kiln_on(&old, &["image", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&old), 0o700);
    assert_eq!(mode(&old.join("layers")), 0o700);
    assert_eq!(mode(&old.join("instances")), 0o700);
    assert_eq!(mode(&old.join("state.db")), 0o600);
}

/// kiln-tiny with the host's `truncate` added, imported as `with-truncate`.
fn tiny_with_truncate(home: &Home, scratch: &Path) {
    let base = home.tiny_base_tarball();
    let root = scratch.join("root");
    std::fs::create_dir(&root).expect("root");
    let mut untar = Command::new("tar");
    untar
        .args(["--numeric-owner", "-xpf"])
        .arg(&base)
        .arg("-C")
        .arg(&root);
    run_ok(untar);
    let truncate = ["/usr/bin/truncate", "/bin/truncate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("truncate (coreutils) on this machine");
    std::fs::copy(truncate, root.join("usr/bin/truncate")).expect("copy truncate");
    let (code, out, err) = home.kiln(&[
        "image",
        "import",
        "with-truncate",
        &root.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

fn host_io_pipeline(scratch: &Path, component: &str) -> PathBuf {
    let data = repo().join("tests/data/embedded/host-io");
    let text = std::fs::read_to_string(data.join("pipeline.yaml"))
        .expect("pipeline")
        .replace("@PARENT@", "with-truncate")
        .replace(
            "components/@COMPONENT@.yaml",
            &data
                .join(format!("components/{component}.yaml"))
                .display()
                .to_string(),
        );
    let path = scratch.join(format!("{component}.yaml"));
    std::fs::write(&path, text).expect("write");
    path
}

/// `kiln run PIPELINE --output json` on `home`, under `/usr/bin/time`: the exit code, the
/// summary, stderr, and the largest resident set (KiB) of kiln and the children it waited for.
fn run_measured(home: &Home, pipeline: &Path) -> (i32, serde_json::Value, String, u64) {
    let rss = home.path().join("maxrss");
    let out = Command::new("/usr/bin/time")
        .arg("-o")
        .arg(&rss)
        .args(["-f", "%M"])
        .arg(built_binary("kiln"))
        .arg("--home")
        .arg(home.path())
        .arg("run")
        .arg(pipeline)
        .args(["--output", "json"])
        .env_remove("KILN_AGENT")
        .env_remove("KILN_HOME")
        .output()
        .expect("time kiln");
    let kib = std::fs::read_to_string(&rss)
        .expect("time's output")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("a max RSS");
    std::fs::remove_file(&rss).expect("rm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), summary, stderr, kib)
}

/// The (device, inode) of `path`, following links.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes of this home's instances: those running the home's copy of kiln-agent (every
/// instance's init and what it runs through it), or in one of its instances' cgroups.
fn instance_processes(home: &Path) -> Vec<String> {
    let agent = file_id(&home.join("agent/kiln-agent"));
    let ids: Vec<String> = std::fs::read_dir(home.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let exe = file_id(&e.path().join("exe"));
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if (agent.is_some() && exe == agent) || ids.iter().any(|id| cgroup.contains(id.as_str())) {
            found.push(format!("{pid}: {}", cgroup.trim()));
        }
    }
    found
}

#[test]
fn a_component_that_floods_its_output_and_links_its_report_cannot_blow_up_the_host() {
    // GIVEN a component that makes its output log 256 MiB (sparse) and its report a link to
    // /dev/null, then fails
    let home = Home::new();
    let scratch = tempfile::tempdir().expect("scratch");
    tiny_with_truncate(&home, scratch.path());
    let pipeline = host_io_pipeline(scratch.path(), "floods");
    // WHEN kiln runs it
    let (code, summary, err, peak_kib) = run_measured(&home, &pipeline);
    eprintln!("kiln's peak resident set with its children: {peak_kib} KiB");
    // THEN the build fails, naming the command, in well under 200 MB of memory
    assert_eq!(code, 1, "{summary}\n{err}");
    assert!(peak_kib < 200 * 1024, "peak RSS {peak_kib} KiB");
    // AND the flood did happen (the output log is the 256 MiB the component made)
    let logs: Vec<(PathBuf, u64)> = entries(&home.path().join("instances"))
        .into_iter()
        .filter(|(p, _)| p.ends_with("output.log"))
        .map(|(p, m)| (p, m.len()))
        .collect();
    assert!(
        logs.iter().any(|(_, len)| *len >= 256 << 20),
        "the component's output log: {logs:?}"
    );
    // AND no file kiln wrote under the home exceeds 1 MB (the component's own log, its upper
    // dir, image blobs and layers aside)
    let big: Vec<String> = entries(home.path())
        .into_iter()
        .filter(|(_, m)| m.is_file() && m.len() > 1_000_000)
        .filter(|(p, _)| {
            let rel = p.strip_prefix(home.path()).expect("inside");
            let skip = ["layers", "agent", "regions", "base.tar"];
            !(skip.iter().any(|s| rel.starts_with(s))
                || p.ends_with("output.log")
                || rel.components().any(|c| c.as_os_str() == "upper"))
        })
        .map(|(p, m)| format!("{} ({} bytes)", p.display(), m.len()))
        .collect();
    assert_eq!(big, Vec::<String>::new());
    // AND the build is FAILED with the reason, its lock released, as the store has it raw
    assert_eq!(
        raw_query(
            &home,
            "SELECT status FROM builds WHERE pipeline = 'host-io'"
        )
        .as_deref(),
        Some("FAILED")
    );
    assert_eq!(
        raw_query(
            &home,
            "SELECT count(*) FROM locks WHERE pipeline = 'host-io'"
        )
        .as_deref(),
        Some("0")
    );
    let body =
        raw_query(&home, "SELECT body FROM builds WHERE pipeline = 'host-io'").expect("build");
    assert!(
        body.len() < 64 * 1024,
        "build record of {} bytes",
        body.len()
    );
    assert!(body.contains("kiln-agent exited with code"), "{body}");
    // AND no process of its instances is left, by executable and by cgroup
    assert_eq!(instance_processes(home.path()), Vec::<String>::new());
    home.assert_nothing_left("host-io");
}

#[test]
fn a_small_failure_reaches_the_build_record_whole() {
    // GIVEN a component that fails with a one-line output
    let home = Home::new();
    let scratch = tempfile::tempdir().expect("scratch");
    tiny_with_truncate(&home, scratch.path());
    // WHEN kiln runs it
    let (code, summary, err) = home.run(&host_io_pipeline(scratch.path(), "fails-small"));
    // THEN the build fails and its record carries the output verbatim
    assert_eq!(code, 1, "{summary}\n{err}");
    let body =
        raw_query(&home, "SELECT body FROM builds WHERE pipeline = 'host-io'").expect("build");
    assert!(
        body.contains("a small failure the host keeps verbatim") && !body.contains("bytes before"),
        "{body}"
    );
    assert_eq!(
        raw_query(
            &home,
            "SELECT status FROM builds WHERE pipeline = 'host-io'"
        )
        .as_deref(),
        Some("FAILED")
    );
    home.assert_nothing_left("host-io");
}

/// What an instance prints reaches the operator's terminal shown, never obeyed: a component that
/// fails with escape sequences on both streams (window title, clear screen, C1 CSI, carriage
/// return, bell, a right-to-left override) has them escaped in `kiln run`'s text output. Positive
/// control: the same bytes are in the build's record (the JSON summary), so the component did
/// print them and the escaping is what keeps them off the terminal.
#[test]
fn escape_sequences_an_instance_prints_are_shown_escaped_on_the_terminal() {
    let home = Home::new();
    let pipeline = repo().join("tests/data/embedded/terminal/pipeline.yaml");
    let (code, summary, err) = home.run(&pipeline);
    assert_eq!(code, 1, "{summary}\n{err}");
    let message = summary["failure"]["message"].as_str().expect("message");
    for raw in [
        "\u{1b}]0;owned\u{7}",
        "\u{1b}[2J",
        "\u{9b}31m",
        "\r",
        "\u{202e}",
    ] {
        assert!(
            message.contains(raw),
            "the control: the record keeps what the component printed ({raw:?}): {message:?}"
        );
    }
    let (code, text, err) = home.kiln(&["run", &pipeline.display().to_string()]);
    assert_eq!(code, 1, "{text}\n{err}");
    for (stream, out) in [("stdout", &text), ("stderr", &err)] {
        let obeyed: Vec<char> = out
            .chars()
            .filter(|&c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{202e}')
            .collect();
        assert!(
            obeyed.is_empty(),
            "{stream} has control characters {obeyed:?}: {out:?}"
        );
    }
    // `kiln builds history` shows the same reason (the status events' failureReason).
    let build = summary["build"].as_str().expect("build id");
    let (code, history, err) = home.kiln(&["builds", "history", build]);
    assert_eq!(code, 0, "{history}{err}");
    assert!(history.contains("FAILED"), "{history}");
    let obeyed: Vec<char> = history
        .chars()
        .filter(|&c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{202e}')
        .collect();
    assert!(
        obeyed.is_empty() && history.contains("\\u{1b}[2J"),
        "builds history: {obeyed:?} in {history:?}"
    );
    assert!(
        text.contains("title\\u{1b}]0;owned\\u{7} clear\\u{1b}[2J")
            && text.contains("hidden\\rshown")
            && text.contains("concealed\\u{202e} reversed"),
        "the output is shown, escaped: {text}"
    );
    home.assert_nothing_left("terminal");
}
