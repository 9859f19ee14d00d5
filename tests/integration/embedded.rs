//! The embedded mode end to end, as root: the real `kiln` and `kiln-agent` binaries, real
//! sandboxes, real OCI layouts read back by skopeo and umoci. Every test checks that nothing is
//! left: no sandbox process, no mount, no live instance, no partial image, the lock free.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::local::oci::Layout;
use kiln::local::SqliteStore;
use kiln::ports::Store;
use serde_json::Value as Json;

use crate::support::{built_binary, repo};

/// A kiln home of its own for one test.
pub(crate) struct Home {
    dir: tempfile::TempDir,
}

fn require_root() {
    assert!(
        nix_is_root(),
        "the embedded tests create namespaces and overlay mounts: run them as root"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn data(name: &str) -> PathBuf {
    repo()
        .join("tests/data/embedded")
        .join(name)
        .join("pipeline.yaml")
}

impl Home {
    pub(crate) fn new() -> Home {
        require_root();
        Home {
            dir: tempfile::Builder::new()
                .prefix("kiln-home-")
                .tempdir_in(std::env::temp_dir())
                .expect("temp home"),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(built_binary("kiln"));
        c.arg("--home").arg(self.path()).args(args);
        c.env_remove("KILN_AGENT").env_remove("KILN_HOME");
        c
    }

    pub(crate) fn kiln(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().expect("run kiln");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kiln run FILE --output json`: the exit code and the summary.
    pub(crate) fn run(&self, pipeline: &Path) -> (i32, Json, String) {
        let (code, out, err) =
            self.kiln(&["run", &pipeline.display().to_string(), "--output", "json"]);
        let summary = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {out}\n{err}"));
        (code, summary, err)
    }

    pub(crate) fn layout(&self, region: &str) -> Layout {
        Layout::open(&self.path().join("regions").join(region).join("images")).expect("layout")
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.path().join("state.db")).expect("store")
    }

    /// Exports `image` of `region` and lists its files.
    pub(crate) fn files_of(&self, region: &str, image: &str) -> (PathBuf, Vec<String>) {
        let tar = self.path().join(format!("{image}.tar"));
        let (code, out, err) = self.kiln(&[
            "image",
            "export",
            image,
            &tar.display().to_string(),
            "--region",
            region,
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let list = Command::new("tar")
            .arg("-tf")
            .arg(&tar)
            .output()
            .expect("tar");
        let names = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
            .collect();
        (tar, names)
    }

    /// kiln's tiny base, bootstrapped as the image `base` and exported as `base.tar`.
    pub(crate) fn tiny_base_tarball(&self) -> PathBuf {
        let (code, out, err) = self.kiln(&["image", "bootstrap", "base", "--variant", "tiny"]);
        assert_eq!(code, 0, "{out}{err}");
        let id = out.split('\t').nth(1).expect("id").to_string();
        let tar = self.path().join("base.tar");
        let (code, _, err) = self.kiln(&["image", "export", &id, &tar.display().to_string()]);
        assert_eq!(code, 0, "{err}");
        tar
    }

    /// Nothing of this home runs, is mounted or is half-written; the pipeline's lock is free.
    pub(crate) fn assert_nothing_left(&self, pipeline: &str) {
        let home = self.path().display().to_string();
        // No process started for this home (keepers name their instance folder).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alive: Vec<String> = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(&home) && c.contains("sandbox"))
                .collect();
            if alive.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox processes left: {alive:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mounts.contains(&home),
            "mounts left under {home}:\n{mounts}"
        );
        // No slirp4netns still serving one of this home's keepers (it names the keeper's PID).
        let keepers: Vec<String> = std::fs::read_dir(self.path().join("instances"))
            .expect("instances")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("instance.json")).ok())
            .filter_map(|b| serde_json::from_slice::<Json>(&b).ok())
            .filter_map(|r| r["keeperPid"].as_u64().map(|p| p.to_string()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let serving: Vec<String> = std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .split('\0')
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .filter(|args| {
                    args.first().is_some_and(|a| a.ends_with("slirp4netns"))
                        && args
                            .iter()
                            .rev()
                            .nth(2)
                            .is_some_and(|p| keepers.contains(p))
                })
                .map(|args| args.join(" "))
                .collect();
            if serving.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "slirp4netns left: {serving:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        for entry in std::fs::read_dir(self.path().join("instances"))
            .expect("instances")
            .flatten()
        {
            let record: Json = serde_json::from_slice(
                &std::fs::read(entry.path().join("instance.json")).expect("instance.json"),
            )
            .expect("json");
            assert_eq!(record["state"], "terminated", "{record}");
            assert!(!entry.path().join("upper").exists(), "upper dir left");
            // No cgroup of the instance's (raw: every hierarchy's kiln folder).
            let id = entry.file_name().to_string_lossy().into_owned();
            for hierarchy in ["", "pids/", "memory/", "unified/"] {
                let cg = PathBuf::from(format!("/sys/fs/cgroup/{hierarchy}kiln/{id}"));
                assert!(!cg.exists(), "cgroup left: {}", cg.display());
            }
        }
        for region in ["us-east-1", "eu-west-1"] {
            let layout = self.layout(region);
            let tmp: Vec<_> = std::fs::read_dir(layout.dir.join("tmp"))
                .expect("tmp")
                .flatten()
                .collect();
            assert!(tmp.is_empty(), "temporary files left in {region}: {tmp:?}");
            // Every blob belongs to an image of the index (read raw: index, manifests, configs).
            let blobs = layout.dir.join("blobs/sha256");
            let read = |digest: &str| -> Json {
                serde_json::from_slice(
                    &std::fs::read(blobs.join(digest.trim_start_matches("sha256:"))).expect("blob"),
                )
                .expect("json")
            };
            let index: Json = serde_json::from_slice(
                &std::fs::read(layout.dir.join("index.json")).expect("index.json"),
            )
            .expect("index");
            let mut used = std::collections::BTreeSet::new();
            for m in index["manifests"].as_array().into_iter().flatten() {
                let digest = m["digest"].as_str().expect("digest");
                used.insert(digest.trim_start_matches("sha256:").to_string());
                let manifest = read(digest);
                for d in std::iter::once(&manifest["config"])
                    .chain(manifest["layers"].as_array().into_iter().flatten())
                {
                    let digest = d["digest"].as_str().expect("digest");
                    used.insert(digest.trim_start_matches("sha256:").to_string());
                }
            }
            let stray: Vec<String> = std::fs::read_dir(&blobs)
                .expect("blobs")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !used.contains(n))
                .collect();
            assert!(
                stray.is_empty(),
                "blobs no image of {region} uses: {stray:?}"
            );
        }
        // The lock, read raw by sqlite3 (not through kiln's store, and without taking it).
        assert!(
            pipeline
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{pipeline}"
        );
        let held = crate::support::run_ok({
            let mut c = Command::new("sqlite3");
            c.arg(self.path().join("state.db")).arg(format!(
                "SELECT build FROM locks WHERE pipeline = '{pipeline}' AND expires > strftime('%s', 'now')"
            ));
            c
        });
        assert!(
            held.trim().is_empty(),
            "{pipeline} is still locked by {held}"
        );
    }

    /// Images of `region` that carry a build id.
    fn built_images(&self, region: &str) -> Vec<String> {
        self.layout(region)
            .images()
            .expect("images")
            .into_iter()
            .filter(|i| i.build_id.is_some())
            .map(|i| i.id)
            .collect()
    }
}

#[test]
fn hello_builds_tests_and_distributes_an_image_in_two_regions() {
    // GIVEN a fresh kiln home and the quickstart example
    let home = Home::new();
    // WHEN it runs
    let (code, summary, err) = home.run(&repo().join("examples/hello/pipeline.yaml"));
    // THEN the build is AVAILABLE with an image in each region
    assert_eq!(code, 0, "{summary}\n{err}");
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    let images = summary["images"].as_object().expect("images");
    assert_eq!(images.len(), 2, "{summary}");
    assert!(err.contains("creating the base image kiln-tiny"), "{err}");
    for (region, id) in images {
        let id = id.as_str().expect("id");
        assert!(id.starts_with("ami-") && id.len() == 21, "{id}");
        // AND the image holds what the builder wrote, and not what it deleted or the sandbox
        // scaffolding
        let (tar, files) = home.files_of(region, id);
        assert!(
            files.iter().any(|f| f == "etc/kiln-release"),
            "{region}: {files:?}"
        );
        assert!(
            !files.iter().any(|f| f == "etc/kiln-base-note"),
            "deleted file came back in {region}"
        );
        assert!(
            !files
                .iter()
                .any(|f| f.starts_with(".kiln") || f.contains(".kiln-agent")),
            "{files:?}"
        );
        let motd = Command::new("tar")
            .arg("-xOf")
            .arg(&tar)
            .arg("etc/motd")
            .output()
            .expect("tar");
        assert_eq!(String::from_utf8_lossy(&motd.stdout), "Hello from kiln");
        // AND a real OCI tool reads the layout: two layers, the tiny base and the build
        let inspect = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:{id}", home.layout(region).dir.display()))
            .output()
            .expect("skopeo (installed by make setup)");
        assert!(
            inspect.status.success(),
            "{}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let info: Json = serde_json::from_slice(&inspect.stdout).expect("skopeo JSON");
        assert_eq!(info["Layers"].as_array().map(Vec::len), Some(2), "{info}");
        let ls = Command::new("umoci")
            .args(["ls", "--layout"])
            .arg(home.layout(region).dir)
            .output()
            .expect("umoci (installed by make setup)");
        assert!(String::from_utf8_lossy(&ls.stdout).contains(id));
    }
    // AND the copy is the same image, blob for blob
    let digest = |region: &str| {
        home.layout(region)
            .images()
            .expect("images")
            .into_iter()
            .find(|i| i.build_id.is_some())
            .expect("built")
            .manifest
            .digest
    };
    assert_eq!(digest("us-east-1"), digest("eu-west-1"));
    // AND eu-west-1 is shared as the pipeline says, and the parameters hold the ids
    let shared = home.layout("eu-west-1").images().expect("images");
    assert!(shared.iter().any(|i| i
        .launch_permissions
        .iter()
        .any(|p| p.accounts == ["123456789012"])));
    let params: Json = serde_json::from_slice(
        &std::fs::read(home.path().join("regions/eu-west-1/parameters.json")).expect("parameters"),
    )
    .expect("json");
    assert_eq!(params["/images/hello/latest"], images["eu-west-1"]);
    // AND each instance ran exactly one command (checks never send twice)
    for entry in std::fs::read_dir(home.path().join("instances"))
        .expect("instances")
        .flatten()
    {
        let commands = std::fs::read_dir(entry.path().join("cmd"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(commands, 1, "{}", entry.path().display());
    }
    // AND the summary counts what AWS would bill: every state and retry of this execution, and
    // at least DefaultWait more for the deployed stack (its triggers give no waitSeconds)
    assert!(summary["stateTransitions"].as_u64() > Some(15), "{summary}");
    assert_eq!(
        summary["aws"]["minStateTransitions"].as_u64(),
        summary["stateTransitions"].as_u64().map(|n| n + 1),
        "{summary}"
    );
    assert_eq!(summary["aws"]["perPoll"]["stateTransitions"], 3);
    // AND its waits for the commands ended by the local event source answering their task
    // tokens, none by the bounded poll (the one definition's `.waitForTaskToken` path)
    assert!(summary["waits"]["byEvent"].as_u64() >= Some(2), "{summary}");
    assert_eq!(summary["waits"]["byTimeout"], 0, "{summary}");
    home.assert_nothing_left("hello");

    // WHEN it runs again unchanged (startCondition onChange)
    let (code, again, err) = home.run(&repo().join("examples/hello/pipeline.yaml"));
    // THEN the build is skipped: exit 0, no instance launched, no new image
    assert_eq!(code, 0, "{again}\n{err}");
    assert_eq!(again["status"], "SKIPPED", "{again}");
    let instances = std::fs::read_dir(home.path().join("instances"))
        .expect("instances")
        .count();
    assert_eq!(
        instances, 2,
        "builder and test instance of the first build only"
    );
    assert_eq!(home.built_images("us-east-1").len(), 1);
    // AND the builds are listed
    let (code, list, _) = home.kiln(&["builds", "list"]);
    assert_eq!(code, 0);
    assert!(
        list.contains("AVAILABLE") && list.contains("SKIPPED"),
        "{list}"
    );
}

/// What `make run` runs: the CLI built without the AWS SDK (`--no-default-features`, a feature
/// set the workspace build never compiles) with its kiln-agent, on the quickstart.
#[test]
fn the_cli_as_make_run_builds_it_bakes_hello() {
    // GIVEN the shipped CLI and agent, and a fresh home
    let home = Home::new();
    let kiln = crate::support::shipped("debug/kiln");
    crate::support::shipped("debug/kiln-agent");
    // WHEN it runs the README's first pipeline
    let out = Command::new(&kiln)
        .arg("--home")
        .arg(home.path())
        .args(["run", "examples/hello/pipeline.yaml", "--output", "json"])
        .current_dir(repo())
        .env_remove("KILN_AGENT")
        .env_remove("KILN_HOME")
        .output()
        .expect("run the shipped kiln");
    // THEN the image is built, tested and distributed
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Json = serde_json::from_str(&text).expect("JSON summary");
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    assert_eq!(
        summary["images"].as_object().map(|m| m.len()),
        Some(2),
        "{summary}"
    );
}

#[test]
fn a_failing_build_component_ends_failed_with_the_step_named_and_nothing_left() {
    let home = Home::new();
    let (code, summary, err) = home.run(&data("breaks-build"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert_eq!(summary["status"], "FAILED");
    let failure = &summary["failure"];
    assert_eq!(failure["error"], "Kiln.ComponentFailed", "{summary}");
    let message = failure["message"].as_str().expect("message");
    assert!(
        message.contains("component breaks, build/Explode"),
        "{message}"
    );
    assert!(
        message.contains("disk on fire"),
        "the output tail: {message}"
    );
    // The text summary says the same to a person.
    let (code, text, _) = home.kiln(&["run", &data("breaks-build").display().to_string()]);
    assert_eq!(code, 1);
    assert!(
        text.contains("build/Explode") && text.contains("disk on fire"),
        "{text}"
    );
    assert!(home.built_images("us-east-1").is_empty());
    home.assert_nothing_left("breaks-build");
}

#[test]
fn a_failing_test_removes_the_image_and_names_the_test_step() {
    let home = Home::new();
    let (code, summary, err) = home.run(&data("breaks-test"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert_eq!(summary["failure"]["error"], "Kiln.TestFailed", "{summary}");
    let message = summary["failure"]["message"].as_str().expect("message");
    assert!(
        message.contains("expects-2, test/VersionIsTwo"),
        "{message}"
    );
    assert!(
        summary["stages"].get("snapshot").is_some(),
        "the image was made before the test"
    );
    for region in ["us-east-1", "eu-west-1"] {
        assert!(
            home.built_images(region).is_empty(),
            "partial image left in {region}"
        );
    }
    // Only the parent's blobs remain.
    let blobs = std::fs::read_dir(home.layout("us-east-1").dir.join("blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 3, "kiln-tiny's manifest, config and layer");
    home.assert_nothing_left("breaks-test");
}

#[test]
fn a_component_that_asks_for_a_reboot_resumes_after_it() {
    let home = Home::new();
    let (code, summary, err) = home.run(&data("reboot"));
    assert_eq!(code, 0, "{summary}\n{err}");
    let id = summary["images"]["us-east-1"].as_str().expect("image");
    let (_, files) = home.files_of("us-east-1", id);
    assert!(
        files.iter().any(|f| f == "var/lib/after-reboot"),
        "{files:?}"
    );
    // The builder booted twice.
    let builder = std::fs::read_dir(home.path().join("instances"))
        .expect("instances")
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("instance.json"))
                .is_ok_and(|t| t.contains("kiln-builder"))
        })
        .expect("builder");
    let output = std::fs::read_dir(builder.path().join("cmd"))
        .expect("cmd")
        .flatten()
        .map(|c| std::fs::read_to_string(c.path().join("output.log")).unwrap_or_default())
        .collect::<String>();
    assert!(
        output.contains("rebooting") && output.contains("resumed after reboot"),
        "{output}"
    );
    // A real restart: the keeper booted the builder twice and the command after it ran under
    // another init than the one before.
    let boots = std::fs::read_to_string(builder.path().join("boots")).expect("boots");
    assert_eq!(boots.trim(), "2");
    let tar = home.path().join("reboot-layer.tar");
    top_layer(&home.layout("us-east-1").dir, id, &tar);
    let read = |name: &str| {
        file_in_tar(&tar, &format!("var/lib/{name}"))
            .trim()
            .to_string()
    };
    let (before, after) = (read("init-before"), read("init-after"));
    assert!(
        !before.is_empty() && !after.is_empty(),
        "{before:?} {after:?}"
    );
    assert_ne!(
        before, after,
        "the same init ran before and after the reboot"
    );
    home.assert_nothing_left("reboot");
}

fn wait_for_marker(home: &Home) {
    // The slow step runs once the marker is in some builder's upper dir.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(home.path().join("instances"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().join("upper/tmp/slow-started").exists())
            })
            .unwrap_or(false);
        if started {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the slow component never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIG`signal` to `child`, or to its whole process group (as a terminal sends Ctrl-C).
fn send_signal(child: &std::process::Child, signal: &str, group: bool) {
    let target = if group {
        format!("-{}", child.id())
    } else {
        child.id().to_string()
    };
    // (it may have ended a moment ago: what it did then is what the caller checks)
    Command::new("kill")
        .args([&format!("-{signal}"), "--", &target])
        .status()
        .expect("kill");
}

/// The build's status as the store has it, read raw by sqlite3 while kiln runs.
fn raw_status(home: &Home, pipeline: &str) -> Option<String> {
    raw_query(
        home,
        &format!("SELECT status FROM builds WHERE pipeline = '{pipeline}' ORDER BY id"),
    )
}

/// One query of the store, read raw by sqlite3 (rows one per line), while kiln runs or after.
pub(crate) fn raw_query(home: &Home, sql: &str) -> Option<String> {
    let db = home.path().join("state.db");
    if !db.exists() {
        return None;
    }
    let out = Command::new("sqlite3").arg(&db).arg(sql).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

#[test]
fn ctrl_c_to_the_process_group_and_sigterm_cancel_at_every_stage_and_leave_nothing() {
    // The copies to the other regions run beside the test (TESTING); DISTRIBUTING only shares
    // and publishes them, too short a moment to interrupt from here.
    for stage in ["BUILDING", "SNAPSHOTTING", "TESTING"] {
        // Ctrl-C as a terminal sends it, to the whole foreground process group (kiln and the
        // agents it runs); SIGTERM as a service manager sends it, to kiln alone.
        for (signal, group, code) in [("INT", true, 130), ("TERM", false, 143)] {
            eprintln!("interrupting at {stage} with SIG{signal}");
            let home = Home::new();
            let mut c = home.command(&[
                "run",
                &data("interrupt").display().to_string(),
                "--output",
                "json",
            ]);
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            let mut child = c
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kiln run");
            let deadline = Instant::now() + Duration::from_secs(120);
            while raw_status(&home, "interrupt").as_deref() != Some(stage) {
                assert!(
                    child.try_wait().expect("wait").is_none(),
                    "the build ended before {stage} ({:?})",
                    raw_status(&home, "interrupt")
                );
                assert!(Instant::now() < deadline, "never {stage}");
                std::thread::sleep(Duration::from_millis(20));
            }
            send_signal(&child, signal, group);
            let out = child.wait_with_output().expect("wait");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{stage} SIG{signal}: {err}");
            assert_eq!(
                raw_status(&home, "interrupt").as_deref(),
                Some("CANCELLED"),
                "one build, CANCELLED: {stage} SIG{signal}: {err}"
            );
            for region in ["us-east-1", "eu-west-1"] {
                assert_eq!(
                    home.built_images(region),
                    Vec::<String>::new(),
                    "{stage} SIG{signal}: an image left in {region}"
                );
            }
            home.assert_nothing_left("interrupt");
        }
    }
}

/// The embedded half of the fault campaign (`make chaos` runs more: KILN_CHAOS_EMBEDDED_BUILDS,
/// KILN_CHAOS_SEED): seeded builds in one home, each with one fault — a failing build or test
/// phase, kill -9 of kiln at a random moment (then `kiln gc`), Ctrl-C to its process group or
/// SIGTERM at a random moment — and after each, raw checks that nothing is left (processes,
/// mounts, instances, cgroups, half-written or stray blobs, the lock) and that the build ended
/// as the fault predicts.
#[test]
fn embedded_fault_campaign_leaves_nothing_behind() {
    let builds: usize = std::env::var("KILN_CHAOS_EMBEDDED_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261201);
    let home = Home::new();
    let mut rng = crate::support::Lcg(seed);
    let kinds = [
        "none",
        "build-fails",
        "test-fails",
        "kill-9",
        "ctrl-c",
        "sigterm",
    ];
    let mut by_kind: std::collections::BTreeMap<String, usize> = Default::default();
    let dir = repo().join("tests/data/embedded/chaos");
    let template = std::fs::read_to_string(dir.join("pipeline.yaml"))
        .expect("pipeline")
        .replace(
            "components/work.yaml",
            &dir.join("components/work.yaml").display().to_string(),
        );
    for n in 0..builds {
        if n > 0 && n % 25 == 0 {
            eprintln!("embedded fault campaign: {n} builds, {by_kind:?}, leftovers 0");
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let fail = match kind {
            "build-fails" => "build",
            "test-fails" => "test",
            _ => "none",
        };
        let pipeline = home.path().join("chaos.yaml");
        // (a version per content: a registered version's definition cannot change)
        let version = match fail {
            "build" => "1.1.0",
            "test" => "1.2.0",
            _ => "1.0.0",
        };
        let text = template
            .replace("@FAIL@", fail)
            .replace("version: 1.0.0", &format!("version: {version}"));
        std::fs::write(&pipeline, text).expect("write");
        let before = raw_status(&home, "chaos").map_or(0, |s| s.lines().count());
        let mut c = home.command(&["run", &pipeline.display().to_string(), "--output", "json"]);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln run");
        // A signal at a random moment of the build (which takes about 3 s here).
        let mut hit = String::from("-");
        if let Some((signal, group)) = match kind {
            "kill-9" => Some(("KILL", false)),
            "ctrl-c" => Some(("INT", true)),
            "sigterm" => Some(("TERM", false)),
            _ => None,
        } {
            std::thread::sleep(Duration::from_millis(rng.below(3500)));
            if child.try_wait().expect("wait").is_none() {
                // (the store lists builds in the order they were made: the last is this one's,
                // once it exists)
                let statuses = raw_status(&home, "chaos").unwrap_or_default();
                hit = if statuses.lines().count() > before {
                    statuses.lines().last().unwrap_or_default().to_string()
                } else {
                    "before its build was recorded".into()
                };
                send_signal(&child, signal, group);
            } else {
                hit = "after the end".into();
            }
        }
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if kind == "kill-9" {
            let (code, out, err) = home.kiln(&["gc"]);
            assert_eq!(code, 0, "build {n}: gc: {out}{err}");
        }
        *by_kind.entry(format!("{kind} ({hit})")).or_default() += 1;
        let what = format!(
            "build {n} ({kind}, at {hit}): exit {:?}\n{err}",
            out.status.code()
        );
        // THEN it ended as the fault predicts
        let statuses = raw_status(&home, "chaos").unwrap_or_default();
        let statuses: Vec<&str> = statuses.lines().collect();
        let unfinished: Vec<&&str> = statuses
            .iter()
            .filter(|s| !["AVAILABLE", "FAILED", "CANCELLED", "SKIPPED"].contains(s))
            .collect();
        assert!(
            unfinished.is_empty(),
            "{what}: builds left unfinished: {unfinished:?}"
        );
        let got = if statuses.len() > before {
            statuses.last().copied().unwrap_or_default()
        } else {
            "NONE"
        };
        let expected: &[&str] = match (kind, hit.as_str()) {
            ("none", _) => &["AVAILABLE"],
            ("build-fails" | "test-fails", _) => &["FAILED"],
            (_, "after the end") => &["AVAILABLE"],
            // A signal may land before the build is recorded, or after its last state.
            _ => &["CANCELLED", "AVAILABLE", "NONE"],
        };
        let failure = raw_query(
            &home,
            "SELECT json_extract(body, '$.failure.message') FROM builds WHERE pipeline = 'chaos' ORDER BY id DESC LIMIT 1",
        )
        .unwrap_or_default();
        assert!(expected.contains(&got), "{what}: ended {got}: {failure}");
        if got == "FAILED" {
            let step = if fail == "build" { "Work" } else { "Check" };
            assert!(failure.contains(step), "{what}: {failure}");
        }
        // AND nothing is left, counted raw
        home.assert_nothing_left("chaos");
    }
    eprintln!(
        "embedded fault campaign (seed {seed}): {builds} builds, faults {by_kind:?}, leftovers 0"
    );
}

#[test]
fn gc_cleans_up_after_a_kiln_that_was_killed() {
    let home = Home::new();
    let mut child = home
        .command(&["run", &data("slow").display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln run");
    wait_for_marker(&home);
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    // The sandbox outlives kiln: gc finds it.
    let (code, out, err) = home.kiln(&["gc"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: Json = serde_json::from_str(&out).expect("gc JSON");
    assert_eq!(
        report["buildsCleaned"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let builds = futures::executor::block_on(home.store().builds("slow")).expect("builds");
    assert_eq!(builds[0].status.as_str(), "CANCELLED");
    home.assert_nothing_left("slow");
}

/// An error no Catch of the state machine takes still ends the build cleanly: `kiln run
/// --timeout` gives the execution a TimeoutSeconds, and a build that outruns it (the slow
/// component sleeps a minute) ends TIMED_OUT in the engine — States.Timeout, which no Catch
/// matches — so only kiln run's reap ends its instances, records it FAILED with the reason and
/// releases the lock. Without the reap the build stays BUILDING with the lock held and the
/// builder running.
#[test]
fn a_build_past_its_timeout_is_reaped_failed_with_nothing_left() {
    let home = Home::new();
    let slow = data("slow").display().to_string();
    // A duration kiln cannot read is refused before anything starts.
    let (code, out, err) = home.kiln(&["run", &slow, "--timeout", "5x"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("the unit must be s, m or h"), "{err}");
    let (code, out, err) = home.kiln(&["run", &slow, "--timeout", "2s", "--output", "json"]);
    let summary: Json = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {out}\n{err}"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert_eq!(summary["status"], "FAILED", "{summary}");
    assert_eq!(summary["error"], "States.Timeout", "{summary}");
    let failure = &summary["failure"];
    assert_eq!(failure["error"], "States.Timeout", "{summary}");
    assert!(
        failure["message"]
            .as_str()
            .is_some_and(|m| m.contains("TimeoutSeconds of 2 seconds")),
        "{summary}"
    );
    // One build: the refused run recorded none.
    let builds = futures::executor::block_on(home.store().builds("slow")).expect("builds");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].status.as_str(), "FAILED");
    home.assert_nothing_left("slow");
}

#[test]
fn invalid_input_is_refused_with_exit_2_and_nothing_created() {
    let home = Home::new();
    let bad = home.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\nversion: 1.0.0\nparent:\n  local: kiln-tiny\ncomponents: []\ndistribution:\n  - region: mars-north-1\n").expect("write");
    let (code, out, err) = home.kiln(&["run", &bad.display().to_string()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("bad.yaml:7:"), "file:line:col: {err}");
    assert!(
        !home.path().join("state.db").exists(),
        "nothing was created"
    );
    // A parent image that does not exist is named, with the command that creates it.
    let missing = home.path().join("missing.yaml");
    std::fs::write(&missing, "name: x\nversion: 1.0.0\nparent:\n  local: my-base\ncomponents:\n  - inline:\n      name: c\n      schemaVersion: 1.0\n      phases:\n        - name: build\n          steps:\n            - name: s\n              action: ExecuteBash\n              inputs:\n                commands: [\"true\"]\ndistribution:\n  - region: us-east-1\n").expect("write");
    let (code, _, err) = home.kiln(&["run", &missing.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kiln image import my-base"), "{err}");
}

#[test]
fn a_private_network_this_machine_cannot_give_is_refused_with_exit_2_and_nothing_created() {
    require_root();
    // GIVEN a pipeline with the default private network, and no slirp4netns on PATH
    let dir = tempfile::tempdir().expect("tmp");
    let home = dir.path().join("home");
    let out = Command::new(built_binary("kiln"))
        .arg("--home")
        .arg(&home)
        .arg("run")
        .arg(data("owners"))
        .env_remove("KILN_AGENT")
        .env("PATH", dir.path())
        .output()
        .expect("kiln run");
    // THEN exit 2 naming what is missing and the choices, and no home was made
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("needs slirp4netns on PATH") && err.contains("network: none"),
        "{err}"
    );
    assert!(!home.exists(), "the home was created");
}

#[test]
fn imported_root_file_systems_become_images_that_run() {
    let home = Home::new();
    // A tarball of a folder with a program in it, imported and listed.
    let tar = home.tiny_base_tarball();
    let (code, out, err) = home.kiln(&[
        "image",
        "import",
        "again",
        &tar.display().to_string(),
        "--region",
        "eu-west-1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, list, _) = home.kiln(&["image", "list", "--output", "json"]);
    assert_eq!(code, 0);
    let list: Json = serde_json::from_str(&list).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let (code, inspect, _) = home.kiln(&["image", "inspect", "again", "--region", "eu-west-1"]);
    assert_eq!(code, 0);
    assert!(inspect.contains("tar+zstd"), "{inspect}");
    // Not a tarball: a clear error, exit 2.
    let junk = home.path().join("junk.bin");
    std::fs::write(
        &junk,
        b"not a tarball at all, not even close................",
    )
    .expect("write");
    let (code, _, err) = home.kiln(&["image", "import", "junk", &junk.display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("not a root file system tarball"), "{err}");
    // rm removes the image and the blobs only it used.
    let (code, _, err) = home.kiln(&["image", "rm", "again", "--region", "eu-west-1"]);
    assert_eq!(code, 0, "{err}");
    let blobs = std::fs::read_dir(home.layout("eu-west-1").dir.join("blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 0);
}

/// `kiln gc --dry-run` says what `kiln gc` would remove, with sizes, and removes nothing; `kiln
/// image rm` frees the unpacked trees no image uses any more, and keeps those another still uses.
#[test]
fn gc_dry_run_lists_what_gc_removes_and_image_rm_frees_unpacked_trees() {
    // GIVEN hello built (kiln-tiny's and hello's layers unpacked), a scratch leftover of 1,000
    // bytes and an unpacked layer of no image with a 500-byte file
    let home = Home::new();
    let (code, summary, err) = home.run(&repo().join("examples/hello/pipeline.yaml"));
    assert_eq!(code, 0, "{summary}\n{err}");
    let layers = home.path().join("layers/sha256");
    let unpacked = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&layers)
            .expect("layers")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = unpacked();
    let scratch = home.path().join("scratch/left-over");
    std::fs::create_dir_all(scratch.parent().expect("scratch")).expect("scratch");
    std::fs::write(&scratch, vec![b'x'; 1000]).expect("leftover");
    let orphan = layers.join("0".repeat(64));
    std::fs::create_dir_all(orphan.join("etc")).expect("orphan layer");
    std::fs::write(orphan.join("etc/file"), vec![b'y'; 500]).expect("orphan file");
    // WHEN gc runs dry
    let (code, out, err) = home.kiln(&["gc", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let dry: Json = serde_json::from_str(&out).expect("gc JSON");
    // THEN it names both with their sizes, and both are still there
    assert_eq!(dry["dryRun"], true, "{dry}");
    assert_eq!(dry["bytesFreed"], 1500, "{dry}");
    assert_eq!(dry["layerDirsRemoved"], 1, "{dry}");
    let paths: Vec<(String, u64)> = dry["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap_or_default().to_string(),
                r["bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        paths.contains(&(scratch.display().to_string(), 1000))
            && paths.contains(&(orphan.display().to_string(), 500)),
        "{dry}"
    );
    assert!(scratch.exists() && orphan.exists());
    // AND gc itself removes exactly what the dry run listed
    let (code, out, err) = home.kiln(&["gc"]);
    assert_eq!(code, 0, "{err}");
    let wet: Json = serde_json::from_str(&out).expect("gc JSON");
    assert_eq!(wet["removed"], dry["removed"], "{wet}");
    assert_eq!(wet["dryRun"], false, "{wet}");
    assert!(!scratch.exists() && !orphan.exists());
    assert_eq!(unpacked(), before, "the images' unpacked layers stay");

    // WHEN hello's images are removed in both regions
    for (region, id) in summary["images"].as_object().expect("images") {
        let id = id.as_str().expect("id");
        let (code, out, err) = home.kiln(&["image", "rm", id, "--region", region]);
        assert_eq!(code, 0, "{out}{err}");
    }
    // THEN the tree of hello's own layer is freed, and kiln-tiny's (still an image) stays
    let after = unpacked();
    let freed: Vec<&String> = before.difference(&after).collect();
    assert_eq!(freed.len(), 1, "freed {freed:?} of {before:?}");
    assert!(!after.is_empty() && after.is_subset(&before), "{after:?}");
    let (code, out, _) = home.kiln(&["gc", "--dry-run"]);
    assert_eq!(code, 0);
    let dry: Json = serde_json::from_str(&out).expect("gc JSON");
    assert_eq!(
        dry["layerDirsRemoved"], 0,
        "image rm left nothing for gc: {dry}"
    );
}

#[test]
fn lifecycle_keeps_the_latest_images_in_every_region_and_skips_excluded_ones() {
    // GIVEN examples/hello rebuilt four times (startCondition always, keepLatest 3)
    let home = Home::new();
    let dir = home.path().join("hello");
    let copy = Command::new("cp")
        .arg("-r")
        .arg(repo().join("examples/hello"))
        .arg(&dir)
        .status()
        .expect("cp");
    assert!(copy.success());
    let file = dir.join("pipeline.yaml");
    let text = std::fs::read_to_string(&file)
        .expect("read")
        .replace("startCondition: onChange", "startCondition: always")
        .replace(
            "keepLatest: 3",
            "keepLatest: 3\n  excludeTags:\n    pinned: \"yes\"",
        );
    std::fs::write(&file, text).expect("write");
    let mut built = Vec::new();
    for _ in 0..4 {
        let (code, summary, err) = home.run(&file);
        assert_eq!(code, 0, "{summary}\n{err}");
        built.push(summary["images"].clone());
    }
    // AND the oldest image in eu-west-1 pinned by a tag
    let pinned = built[0]["eu-west-1"].as_str().expect("id").to_string();
    home.layout("eu-west-1")
        .update(|images| {
            for i in images.iter_mut().filter(|i| i.id == pinned) {
                i.tags.insert("pinned".into(), "yes".into());
            }
            Ok(())
        })
        .expect("tag");
    // WHEN lifecycle runs dry
    let f = file.display().to_string();
    let (code, out, err) = home.kiln(&["lifecycle", &f, "--dry-run", "--output", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let plan: Json = serde_json::from_str(&out).expect("json");
    let actions = plan["actions"].as_array().expect("actions").clone();
    // THEN it would delete the oldest build's image in us-east-1 only (eu-west-1's is pinned)
    assert_eq!(actions.len(), 1, "{plan}");
    assert_eq!(actions[0]["region"], "us-east-1");
    assert_eq!(actions[0]["image"], built[0]["us-east-1"]);
    assert_eq!(actions[0]["verdict"], "delete");
    assert_eq!(
        home.built_images("us-east-1").len(),
        4,
        "a dry run changes nothing"
    );
    // WHEN it runs for real
    let (code, out, err) = home.kiln(&["lifecycle", &f]);
    assert_eq!(code, 0, "{out}{err}");
    // THEN the newest three remain in us-east-1, all four (one pinned) in eu-west-1
    let left = home.built_images("us-east-1");
    assert_eq!(left.len(), 3);
    assert!(!left.contains(&built[0]["us-east-1"].as_str().expect("id").to_string()));
    assert_eq!(home.built_images("eu-west-1").len(), 4);
    let (_, again, _) = home.kiln(&["lifecycle", &f, "--dry-run"]);
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn serve_runs_applied_pipelines_on_their_schedule_and_disables_a_failing_one() {
    let home = Home::new();
    // GIVEN hello applied with a weekly schedule in Berlin time
    let dir = home.path().join("hello");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(repo().join("examples/hello"))
        .arg(&dir)
        .status()
        .expect("cp")
        .success());
    let file = dir.join("pipeline.yaml");
    let text = std::fs::read_to_string(&file).expect("read").replace(
        "schedule:\n  startCondition: onChange",
        "schedule:\n  cron: cron(0 4 ? * SUN *)\n  timezone: Europe/Berlin\n  startCondition: onChange",
    );
    std::fs::write(&file, text).expect("write");
    let (code, out, err) = home.kiln(&["apply", &file.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("cron(0 4 ? * SUN *) in Europe/Berlin, next run"),
        "{out}"
    );
    let schedules = |home: &Home| -> Json {
        let (code, out, _) = home.kiln(&["serve", "--list"]);
        assert_eq!(code, 0);
        serde_json::from_str(&out).expect("json")
    };
    let next = schedules(&home)[0]["nextRun"]
        .as_str()
        .expect("next run")
        .to_string();
    let at = chrono::DateTime::parse_from_rfc3339(&next).expect("rfc3339");
    assert_eq!(
        at.with_timezone(&chrono_tz::Europe::Berlin)
            .format("%a %H:%M")
            .to_string(),
        "Sun 04:00"
    );
    // WHEN serve looks before it is due, nothing runs
    let (code, _, err) = home.kiln(&["serve", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert!(home.built_images("us-east-1").is_empty());
    // WHEN it is due
    let (code, out, err) = home.kiln(&["serve", "--once", "--now", &next]);
    assert_eq!(code, 0, "{out}{err}");
    // THEN the build ran, triggered by the schedule, and the next run is a week later
    let builds = futures::executor::block_on(home.store().builds("hello")).expect("builds");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].status.as_str(), "AVAILABLE");
    assert_eq!(format!("{:?}", builds[0].trigger.kind), "Schedule");
    let later = schedules(&home)[0]["nextRun"]
        .as_str()
        .expect("next")
        .to_string();
    let later = chrono::DateTime::parse_from_rfc3339(&later).expect("rfc3339");
    assert_eq!((later - at).num_days(), 7);

    // GIVEN a failing pipeline that may fail once before its schedule is disabled
    let broken = home.path().join("broken");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(repo().join("tests/data/embedded/breaks-build"))
        .arg(&broken)
        .status()
        .expect("cp")
        .success());
    let file = broken.join("pipeline.yaml");
    let text = std::fs::read_to_string(&file).expect("read")
        + "schedule:\n  cron: cron(0/15 * * * ? *)\n  disableAfterFailures: 1\n";
    std::fs::write(&file, text).expect("write");
    let (code, out, err) = home.kiln(&["apply", &file.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let row = |home: &Home| {
        schedules(home)
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["pipeline"] == "breaks-build")
            .cloned()
            .expect("row")
    };
    let next = row(&home)["nextRun"].as_str().expect("next").to_string();
    // WHEN it runs and fails
    let (code, _, _) = home.kiln(&["serve", "--once", "--now", &next]);
    assert_eq!(code, 1);
    // THEN its schedule is disabled, with the reason; the event says so
    let r = row(&home);
    assert_eq!(r["enabled"], false, "{r}");
    assert!(
        r["disabledReason"]
            .as_str()
            .unwrap_or_default()
            .contains("1 consecutive failed builds"),
        "{r}"
    );
    let events = std::fs::read_to_string(home.path().join("events.jsonl")).expect("events");
    assert!(
        events.contains("schedule disabled after 1 consecutive failed builds"),
        "{events}"
    );
    home.assert_nothing_left("breaks-build");
}

/// Regression (issue #16): 20 `kiln run` processes of one pipeline on one home at once make
/// exactly one build; every other process says who holds the lock, and none crashes (one used
/// to die on `UNIQUE constraint failed: pipelines.name, pipelines.version` registering the
/// version).
#[test]
fn twenty_concurrent_runs_on_sqlite_make_one_build_and_name_the_holder() {
    // GIVEN a home with the tiny base
    let home = Home::new();
    let (code, out, err) = home.kiln(&["image", "bootstrap", "kiln-tiny", "--variant", "tiny"]);
    assert_eq!(code, 0, "{out}{err}");
    let file = repo().join("examples/hello/pipeline.yaml");
    // WHEN 20 processes run the pipeline at the same moment
    let children: Vec<std::process::Child> = (0..20)
        .map(|_| {
            home.command(&["run", &file.display().to_string(), "--output", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kiln run")
        })
        .collect();
    let outs: Vec<(i32, String, String)> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().expect("wait");
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .collect();
    // THEN one build is AVAILABLE and every other run was refused, naming that build
    let builds =
        futures::executor::block_on(Store::builds(&home.store(), "hello")).expect("builds");
    let real: Vec<_> = builds
        .iter()
        .filter(|b| b.status != kiln::model::build::BuildStatus::Skipped)
        .collect();
    assert_eq!(real.len(), 1, "{builds:?}\n{outs:?}");
    let holder = real[0].id.as_str().to_string();
    let mut winners = 0;
    for (code, out, err) in &outs {
        let summary: Json = serde_json::from_str(out)
            .unwrap_or_else(|e| panic!("no crash, a summary ({e}): exit {code}\n{out}\n{err}"));
        if summary["status"] == "AVAILABLE" {
            winners += 1;
            assert_eq!(*code, 0);
        } else {
            assert!(
                summary["status"] == "SKIPPED" || format!("{summary}{err}").contains(&holder),
                "a refused run names the holder {holder}: exit {code}\n{summary}\n{err}"
            );
        }
    }
    assert_eq!(winners, 1, "{outs:?}");
    home.assert_nothing_left("hello");
}

/// The text of the file whose path ends with `name` in the tarball `tar`.
pub(crate) fn file_in_tar(tar: &Path, name: &str) -> String {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(tar)
        .arg("--wildcards")
        .arg(format!("*{name}"))
        .output()
        .expect("tar");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of `tar -tv --numeric-owner` (mode, owner/group by number, …) for the entry whose
/// path ends with `name`.
fn listed(tar: &Path, name: &str) -> String {
    let listing = crate::support::run_ok({
        let mut c = Command::new("tar");
        c.arg("--numeric-owner").arg("-tvf").arg(tar);
        c
    });
    listing
        .lines()
        .find(|l| l.ends_with(name))
        .unwrap_or_else(|| panic!("{name} in\n{listing}"))
        .to_string()
}

/// The top layer of `image` (the build's own) in the OCI layout `layout`, decompressed into the
/// plain tar `out`: found by skopeo and decompressed by zstd, not read back by kiln.
pub(crate) fn top_layer(layout: &Path, image: &str, out: &Path) {
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:{image}", layout.display()))
        .output()
        .expect("skopeo (installed by make setup)");
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let manifest: Json = serde_json::from_slice(&raw.stdout).expect("manifest");
    let digest = manifest["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("a layer");
    let blob = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let status = Command::new("zstd")
        .args(["-dqf", "-o"])
        .arg(out)
        .arg(&blob)
        .status()
        .expect("zstd");
    assert!(status.success(), "zstd -d {}", blob.display());
}

/// Listeners on the host for the probe's network checks.
struct Listeners {
    /// On this machine's own address: what outbound access reaches.
    outside: std::net::SocketAddr,
    /// On 127.0.0.1 only: what an instance reaches only when it shares the host's network.
    loopback: u16,
    /// Connections each accepted: (outside, loopback).
    accepted: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>,
}

/// This machine's first global IPv4 address, as `ip` lists it.
pub(crate) fn host_address() -> std::net::Ipv4Addr {
    let out = crate::support::run_ok({
        let mut c = Command::new("ip");
        c.args(["-4", "-o", "addr", "show", "scope", "global"]);
        c
    });
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the network tests need an address besides loopback: {out}"))
}

impl Listeners {
    fn start() -> Listeners {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let accepted = std::sync::Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let outside = std::net::TcpListener::bind((host_address(), 0)).expect("bind outside");
        let loopback = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addresses = (
            outside.local_addr().expect("addr"),
            loopback.local_addr().expect("addr").port(),
        );
        for (i, l) in [outside, loopback].into_iter().enumerate() {
            let count = accepted.clone();
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    count[i].fetch_add(1, Ordering::SeqCst);
                    drop(c);
                }
            });
        }
        Listeners {
            outside: addresses.0,
            loopback: addresses.1,
            accepted,
        }
    }

    fn accepted(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.accepted[0].load(Ordering::SeqCst),
            self.accepted[1].load(Ordering::SeqCst),
        )
    }
}

/// The probe's pipeline in `dir`, aimed at `net`, with `infrastructure` for its infrastructure
/// block (`privileged: false` is the default posture and network).
fn probe_pipeline(dir: &Path, net: &Listeners, infrastructure: &str) -> PathBuf {
    let data = repo().join("tests/data/embedded/hostile");
    let text = std::fs::read_to_string(data.join("pipeline.yaml"))
        .expect("pipeline")
        .replace(
            "@OUTBOUND@",
            &format!("{}/{}", net.outside.ip(), net.outside.port()),
        )
        .replace("@LOOPBACK@", &net.loopback.to_string())
        .replace("  privileged: false", &format!("  {infrastructure}"))
        .replace(
            "components/probe.yaml",
            &data.join("components/probe.yaml").display().to_string(),
        );
    let path = dir.join("probe-pipeline.yaml");
    std::fs::write(&path, text).expect("write");
    path
}

/// The probe's `key=value` lines, read from the image it built.
fn probe_results(home: &Home, pipeline: &Path) -> std::collections::BTreeMap<String, String> {
    let (code, summary, err) = home.run(pipeline);
    assert_eq!(code, 0, "{summary}\n{err}");
    let id = summary["images"]["us-east-1"].as_str().expect("image");
    let tar = home.path().join("probe-layer.tar");
    top_layer(&home.layout("us-east-1").dir, id, &tar);
    file_in_tar(&tar, "var/lib/probe.txt")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_hostile_component_finds_the_sandbox_closed() {
    let home = Home::new();
    let net = Listeners::start();
    let pipeline = probe_pipeline(home.path(), &net, "privileged: false");
    let probe = probe_results(&home, &pipeline);
    // Capabilities: podman's default set and nothing else, in every set; none ambient.
    // CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT SETFCAP
    let podman: u64 = [0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31]
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    for set in ["CapBnd", "CapEff", "CapPrm"] {
        let got = u64::from_str_radix(&probe[set], 16).expect(set);
        assert_eq!(got, podman, "{set} = {got:#x}: {probe:?}");
    }
    assert_eq!(probe["CapAmb"], "0000000000000000");
    assert_eq!(probe["NoNewPrivs"], "1");
    assert_eq!(probe["Seccomp"], "2", "a seccomp filter");
    // Everything the probe tried is refused.
    for key in [
        "write_proc_sys_hostname",
        "access_core_pattern",
        "access_drop_caches",
        "access_sysrq_trigger",
        "read_kcore",
        "read_keys",
        "read_timer_list",
        "list_sys_firmware",
        "access_sys",
        "mount_tmpfs",
        "remount_agent_rw",
        "bind_over_agent",
        "write_agent",
        "unshare_user",
        "unshare_mount",
        "mknod_block",
        "mknod_char",
        "host_loopback_via_gateway",
        "host_loopback",
    ] {
        assert_eq!(
            probe.get(key).map(String::as_str),
            Some("no"),
            "{key}: {probe:?}"
        );
    }
    assert_eq!(
        probe["dev_nodes"].trim(),
        "fd full null ptmx pts random shm stderr stdin stdout urandom zero"
    );
    assert_eq!(probe["block_devices"], "0");
    // Its own network: loopback and slirp4netns's tap, its forwarder as resolver, this
    // machine's own address refused by the egress policy (tests/integration/egress.rs has the
    // rest of it), the host's loopback out of reach.
    assert_eq!(probe["net_ifaces"].trim(), "lo tap0", "{probe:?}");
    assert_eq!(probe["nameserver"].trim(), "10.0.2.3", "{probe:?}");
    assert_eq!(probe["outbound"], "no", "{probe:?}");
    let (outside, loopback) = net.accepted();
    assert_eq!(outside, 0, "the instance reached the host's own address");
    assert_eq!(loopback, 0, "the instance reached the host's loopback");
    // Its own cgroup namespace: the host's cgroup paths are not visible.
    assert!(
        probe["cgroup"]
            .split(' ')
            .filter(|l| !l.is_empty())
            .all(|l| l.ends_with(":/")),
        "{probe:?}"
    );
    let keeper = std::fs::read_dir(home.path().join("instances"))
        .expect("instances")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("keeper.log")).unwrap_or_default())
        .collect::<String>();
    assert!(keeper.contains("limits: cgroup"), "{keeper}");
    home.assert_nothing_left("hostile");

    // AND the same probe with `privileged: true` can do what the posture refuses: the probe
    // tells a closed sandbox from an open one.
    let home = Home::new();
    let pipeline = probe_pipeline(home.path(), &net, "privileged: true");
    let open = probe_results(&home, &pipeline);
    assert_eq!(open["Seccomp"], "0", "{open:?}");
    assert_eq!(open["mount_tmpfs"], "yes", "{open:?}");
    assert_eq!(open["mknod_block"], "yes", "{open:?}");
    home.assert_nothing_left("hostile");
}

#[test]
fn network_host_and_none_give_what_they_say_and_nothing_else() {
    let net = Listeners::start();
    // `host`, by explicit choice: the machine's interfaces and its loopback.
    let home = Home::new();
    let pipeline = probe_pipeline(home.path(), &net, "network: host");
    let probe = probe_results(&home, &pipeline);
    let mut mine: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    mine.sort();
    assert_eq!(probe["net_ifaces"].trim(), mine.join(" "), "{probe:?}");
    assert_eq!(probe["outbound"], "yes", "{probe:?}");
    assert_eq!(probe["host_loopback"], "yes", "{probe:?}");
    assert_eq!(net.accepted().1, 1, "the host's loopback listener");
    // Its /etc/resolv.conf says what the host's does, but is a copy: not the host's file.
    let host_resolv = std::fs::metadata("/etc/resolv.conf").expect("/etc/resolv.conf");
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = (host_resolv.dev(), host_resolv.ino());
    let host_file = format!("{}:{}", dev, ino);
    assert!(!probe["resolv_file"].is_empty(), "{probe:?}");
    assert_ne!(
        probe["resolv_file"], host_file,
        "the host's own resolv.conf"
    );
    home.assert_nothing_left("hostile");
    // `none`: loopback only, nothing goes out.
    let home = Home::new();
    let before = net.accepted();
    let pipeline = probe_pipeline(home.path(), &net, "network: none");
    let probe = probe_results(&home, &pipeline);
    assert_eq!(probe["net_ifaces"].trim(), "lo", "{probe:?}");
    for key in ["outbound", "host_loopback", "host_loopback_via_gateway"] {
        assert_eq!(probe[key], "no", "{key}: {probe:?}");
    }
    assert_eq!(net.accepted(), before);
    home.assert_nothing_left("hostile");
}

#[test]
fn links_planted_in_the_command_folder_are_not_followed_by_the_host() {
    let home = Home::new();
    // A scratch file and folder the links point at, outside the instance.
    let scratch = tempfile::tempdir().expect("scratch");
    std::fs::write(scratch.path().join("file"), "untouched").expect("file");
    std::fs::create_dir(scratch.path().join("folder")).expect("folder");
    let dir = repo().join("tests/data/embedded/hostile-links");
    let text = std::fs::read_to_string(dir.join("pipeline.yaml"))
        .expect("pipeline")
        .replace("@VICTIM@", &scratch.path().display().to_string())
        .replace(
            "components/plant.yaml",
            &dir.join("components/plant.yaml").display().to_string(),
        );
    let pipeline = scratch.path().join("pipeline.yaml");
    std::fs::write(&pipeline, text).expect("write");
    let (code, summary, err) = home.run(&pipeline);
    // The host refuses to reopen the command's output through the link after the reboot.
    assert_eq!(code, 1, "{summary}\n{err}");
    assert!(
        summary.to_string().contains("symbolic link"),
        "{summary}\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(scratch.path().join("file")).expect("file"),
        "untouched"
    );
    let entries: Vec<_> = std::fs::read_dir(scratch.path().join("folder"))
        .expect("folder")
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
    std::fs::remove_file(&pipeline).expect("rm");
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("scratch")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    home.assert_nothing_left("hostile-links");
}

/// An ordinary user of this machine for the rootless tests (created once, as root): a system
/// user without subordinate ids (the single mapping), or, `subordinate`, one with a range in
/// /etc/subuid and /etc/subgid (as `useradd` gives an ordinary user; 2000000–2065535 where it
/// did not).
fn test_user(subordinate: bool) -> (u32, u32) {
    let name = if subordinate {
        "kiln-subids"
    } else {
        "kiln-rootless"
    };
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        let mut c = Command::new("useradd");
        if !subordinate {
            c.arg("--system");
        }
        let out = c
            .args(["--no-create-home", "--shell", "/bin/sh", name])
            .output()
            .expect("useradd");
        assert!(
            out.status.success() || id("-u").is_some(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if subordinate {
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !text.lines().any(|l| l.starts_with(&format!("{name}:"))) {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .expect(file);
                writeln!(f, "{name}:2000000:65536").expect(file);
            }
        }
    }
    let (uid, gid) = (id("-u").expect("uid"), id("-g").expect("gid"));
    // The cgroups root delegates to the user, as kiln's message says: its instances are bounded
    // (kiln refuses to start them otherwise).
    for parent in kiln::confine::cgroup_parents(uid) {
        std::fs::create_dir_all(&parent).expect("delegate a cgroup");
        std::os::unix::fs::chown(&parent, Some(uid), Some(gid)).expect("delegate a cgroup");
        for f in ["cgroup.procs", "tasks"] {
            let _ = std::os::unix::fs::chown(parent.join(f), Some(uid), Some(gid));
        }
    }
    (uid, gid)
}

fn ordinary_user() -> (u32, u32) {
    test_user(false)
}

/// `kiln` as `user`, in a home it owns.
pub(crate) fn kiln_as(user: (u32, u32), home: &Path, args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(built_binary("kiln"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("KILN_AGENT")
        .env_remove("KILN_HOME")
        .env("HOME", home)
        .uid(user.0)
        .gid(user.1)
        .output()
        .expect("run kiln as the ordinary user");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kiln` as the ordinary user without subordinate ids.
fn kiln_as_user(home: &Path, args: &[&str]) -> (i32, String, String) {
    kiln_as(ordinary_user(), home, args)
}

/// `kiln run PIPELINE --output json` as the ordinary user; the summary of a build that succeeded.
fn run_as_user(home: &Path, pipeline: &Path) -> Json {
    let (code, out, err) = kiln_as_user(
        home,
        &["run", &pipeline.display().to_string(), "--output", "json"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str(&out).expect("summary")
}

/// A temporary home owned by `user`.
pub(crate) fn home_of(user: (u32, u32)) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kiln-rootless-")
        .tempdir()
        .expect("home");
    std::os::unix::fs::chown(dir.path(), Some(user.0), Some(user.1)).expect("chown");
    dir
}

/// Nothing of an ordinary user's instances under `home` runs or is mounted.
fn assert_user_left_nothing(home: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&home.display().to_string()), "{mounts}");
    let running: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&home.display().to_string()) && c.contains("sandbox"))
        .collect();
    assert!(running.is_empty(), "{running:?}");
}

#[test]
fn an_ordinary_user_builds_hello_in_two_regions_inside_a_closed_sandbox() {
    require_root();
    let dir = home_of(ordinary_user());
    let home = dir.path();
    let summary = run_as_user(home, &repo().join("examples/hello/pipeline.yaml"));
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    for region in ["us-east-1", "eu-west-1"] {
        assert!(summary["images"][region].is_string(), "{summary}");
    }
    // The probe, as that user: the same posture from inside, its own network included.
    let net = Listeners::start();
    let pipeline = probe_pipeline(home, &net, "privileged: false");
    let summary = run_as_user(home, &pipeline);
    let image = summary["images"]["us-east-1"].as_str().expect("image");
    let tar = home.join("probe.tar");
    let (code, out, err) = kiln_as_user(
        home,
        &[
            "image",
            "export",
            image,
            &tar.display().to_string(),
            "--region",
            "us-east-1",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let line = listed(&tar, "var/lib/probe.txt");
    assert!(
        line.contains(" 0/0 "),
        "the user is root inside, and in the image: {line}"
    );
    // AND in the layer itself, as skopeo and zstd find it
    let layer = home.join("probe-layer.tar");
    top_layer(&home.join("regions/us-east-1/images"), image, &layer);
    let line = listed(&layer, "var/lib/probe.txt");
    assert!(line.contains(" 0/0 "), "the layer: {line}");
    assert_probe_closed(&file_in_tar(&layer, "var/lib/probe.txt"), &net);
    assert_user_left_nothing(home);
}

#[test]
fn an_ordinary_user_with_subordinate_ids_builds_images_whose_files_keep_their_owners() {
    require_root();
    let user = test_user(true);
    let dir = home_of(user);
    let home = dir.path();
    let pipeline = repo().join("tests/data/embedded/owners/pipeline.yaml");
    let (code, out, err) = kiln_as(
        user,
        home,
        &["run", &pipeline.display().to_string(), "--output", "json"],
    );
    // The test phase, on a fresh instance of the image, found the owners and modes it was given.
    assert_eq!(code, 0, "{out}\n{err}");
    let summary: Json = serde_json::from_str(&out).expect("summary");
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    // The layer, as skopeo and zstd find it: the folder and file belong to 1000/1000.
    let image = summary["images"]["us-east-1"].as_str().expect("image");
    let layer = home.join("owners-layer.tar");
    top_layer(&home.join("regions/us-east-1/images"), image, &layer);
    for (name, mode) in [
        ("var/lib/app", "drwx------"),
        ("var/lib/app/key", "-rw-------"),
    ] {
        let line = listed(&layer, name);
        assert!(
            line.starts_with(mode) && line.contains(" 1000/1000 "),
            "{line}"
        );
    }
    // Inside, the user was root and 1–65535 were its subordinate ids.
    let start = std::fs::read_to_string("/etc/subuid")
        .expect("/etc/subuid")
        .lines()
        .find_map(|l| l.strip_prefix("kiln-subids:").map(str::to_string))
        .and_then(|r| r.split(':').next().map(str::to_string))
        .expect("the user's range");
    let map = file_in_tar(&layer, "var/lib/uid_map");
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["0", user.0.to_string().as_str(), "1"],
            vec!["1", start.as_str(), "65535"]
        ],
        "{map}"
    );
    // AND the hostile probe finds the same closed sandbox when kiln runs in the namespace
    let net = Listeners::start();
    let probe = probe_pipeline(home, &net, "privileged: false");
    std::os::unix::fs::chown(&probe, Some(user.0), Some(user.1)).expect("chown");
    let (code, out, err) = kiln_as(
        user,
        home,
        &["run", &probe.display().to_string(), "--output", "json"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let probed: Json = serde_json::from_str(&out).expect("summary");
    let probe_image = probed["images"]["us-east-1"].as_str().expect("image");
    let probe_layer = home.join("probe-layer.tar");
    top_layer(
        &home.join("regions/us-east-1/images"),
        probe_image,
        &probe_layer,
    );
    assert_probe_closed(&file_in_tar(&probe_layer, "var/lib/probe.txt"), &net);
    let (code, out, err) = kiln_as(user, home, &["image", "rm", probe_image]);
    assert_eq!(code, 0, "{out}{err}");
    assert_user_left_nothing(home);
    // AND kiln, as that user, removes what only the subordinate ids own: the images, then gc.
    for region in ["us-east-1", "eu-west-1"] {
        let id = summary["images"][region].as_str().expect("image");
        let (code, out, err) = kiln_as(user, home, &["image", "rm", id, "--region", region]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = kiln_as(user, home, &["gc"]);
    assert_eq!(code, 0, "{out}{err}");
    let foreign: Vec<String> = walkdir(home)
        .into_iter()
        .filter(|(_, uid)| *uid != user.0)
        .map(|(p, uid)| format!("{} ({uid})", p.display()))
        .collect();
    assert!(foreign.is_empty(), "left, owned by others: {foreign:?}");
}

/// The probe's record, as an ordinary user's instance wrote it: the posture closed, its own
/// network (out to `net`'s outside listener, not to the host's loopback).
fn assert_probe_closed(text: &str, net: &Listeners) {
    for want in [
        "CapBnd=00000000800405fb",
        "CapEff=00000000800405fb",
        "NoNewPrivs=1",
        "Seccomp=2",
        "mount_tmpfs=no",
        "remount_agent_rw=no",
        "write_agent=no",
        "unshare_user=no",
        "mknod_block=no",
        "access_core_pattern=no",
        "write_proc_sys_hostname=no",
        "block_devices=0",
        "net_ifaces=lo tap0 ",
        "outbound=no",
        "host_loopback_via_gateway=no",
        "host_loopback=no",
    ] {
        assert!(text.lines().any(|l| l == want), "{want}: {text}");
    }
    assert_eq!(
        net.accepted().0,
        0,
        "the instance reached the host's own address"
    );
    assert_eq!(
        net.accepted().1,
        0,
        "the instance reached the host's loopback"
    );
}

/// What a root file system holds at one path, as the tests compare it.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    /// `d`, `f`, `l`, `p`, `c`, `b`, `s`.
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    /// A file's SHA-256, a link's target, a device's numbers.
    what: String,
    /// The other names of a file's inode (hard links), sorted.
    also: Vec<PathBuf>,
}

/// Every entry under `root` (links not followed), keyed by its path inside.
fn root_file_system(root: &Path) -> std::collections::BTreeMap<PathBuf, Node> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut nodes = std::collections::BTreeMap::new();
    let mut inodes: std::collections::BTreeMap<u64, Vec<PathBuf>> = Default::default();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).expect("stat");
        let rel = PathBuf::from("/").join(p.strip_prefix(root).expect("inside"));
        let t = m.file_type();
        let (kind, what) = if t.is_dir() {
            todo.extend(
                std::fs::read_dir(&p)
                    .expect("dir")
                    .flatten()
                    .map(|e| e.path()),
            );
            ('d', String::new())
        } else if t.is_symlink() {
            (
                'l',
                std::fs::read_link(&p).expect("link").display().to_string(),
            )
        } else if t.is_file() {
            inodes.entry(m.ino()).or_default().push(rel.clone());
            let bytes = std::fs::read(&p).expect("read");
            ('f', hex::encode(Sha256::digest(&bytes)))
        } else if t.is_fifo() {
            ('p', String::new())
        } else if t.is_socket() {
            ('s', String::new())
        } else {
            let kind = if t.is_char_device() { 'c' } else { 'b' };
            (kind, format!("{}:{}", m.rdev() >> 8, m.rdev() & 0xff))
        };
        nodes.insert(
            rel,
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                what,
                also: Vec::new(),
            },
        );
    }
    for names in inodes.into_values().filter(|n| n.len() > 1) {
        for n in &names {
            let mut others: Vec<PathBuf> = names.iter().filter(|o| *o != n).cloned().collect();
            others.sort();
            nodes.get_mut(n).expect("node").also = others;
        }
    }
    nodes
}

#[test]
fn umoci_and_skopeo_read_an_image_as_the_root_file_system_kiln_exports() {
    // GIVEN an image with other owners, modes, hard and symbolic links, a fifo, a set-user-id
    // file, an empty folder, a whiteout and an opaque folder over a parent's folder with files
    let home = Home::new();
    let p = |name: &str| home.path().join(name).display().to_string();
    let run = |args: &[&str]| {
        crate::support::run_ok({
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        })
    };
    let base = home.tiny_base_tarball();
    std::fs::create_dir(p("base")).expect("mkdir");
    run(&[
        "tar",
        "--numeric-owner",
        "-xpf",
        &base.display().to_string(),
        "-C",
        &p("base"),
    ]);
    std::fs::create_dir_all(home.path().join("base/opt/old")).expect("mkdir");
    for f in ["a", "b"] {
        std::fs::write(home.path().join("base/opt/old").join(f), f).expect("write");
    }
    let (code, out, err) = home.kiln(&["image", "import", "interop-base", &p("base")]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = repo().join("tests/data/embedded/owners");
    let text = std::fs::read_to_string(dir.join("pipeline.yaml"))
        .expect("pipeline")
        .replace("local: kiln-tiny", "local: interop-base")
        .replace(
            "components/owners.yaml",
            &dir.join("components/owners.yaml").display().to_string(),
        );
    std::fs::write(p("pipeline.yaml"), text).expect("write");
    let (code, summary, err) = home.run(&home.path().join("pipeline.yaml"));
    assert_eq!(code, 0, "{summary}\n{err}");
    let id = summary["images"]["us-east-1"].as_str().expect("image");
    let layout = home.layout("us-east-1").dir;
    // WHEN skopeo copies it out of kiln's layout into a dir: (checking every blob's digest), then
    // into a new layout with gzip layers (umoci 0.4.7 reads no zstd), and umoci unpacks that
    run(&[
        "skopeo",
        "copy",
        &format!("oci:{}:{id}", layout.display()),
        &format!("dir:{}", p("copied")),
    ]);
    run(&[
        "skopeo",
        "copy",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        &format!("dir:{}", p("copied")),
        &format!("oci:{}:copied", p("relayout")),
    ]);
    run(&[
        "umoci",
        "unpack",
        "--image",
        &format!("{}:copied", p("relayout")),
        &p("bundle"),
    ]);
    // AND kiln exports it, extracted by tar
    let (code, out, err) = home.kiln(&["image", "export", id, &p("export.tar")]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::create_dir(p("exported")).expect("mkdir");
    run(&[
        "tar",
        "--numeric-owner",
        "-xpf",
        &p("export.tar"),
        "-C",
        &p("exported"),
    ]);
    // THEN both root file systems hold the same entries: kind, mode, owner, content, link target,
    // hard links
    let umoci = root_file_system(&home.path().join("bundle/rootfs"));
    let kiln = root_file_system(&home.path().join("exported"));
    let only = |a: &std::collections::BTreeMap<PathBuf, Node>,
                b: &std::collections::BTreeMap<PathBuf, Node>| {
        a.keys()
            .filter(|k| !b.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        only(&umoci, &kiln).is_empty(),
        "only umoci has {:?}",
        only(&umoci, &kiln)
    );
    assert!(
        only(&kiln, &umoci).is_empty(),
        "only kiln has {:?}",
        only(&kiln, &umoci)
    );
    for (path, node) in &umoci {
        assert_eq!(Some(node), kiln.get(path), "{}", path.display());
    }
    // AND what the build made is there, as it was made; what it removed is not
    let at = |p: &str| umoci.get(Path::new(p)).unwrap_or_else(|| panic!("{p}"));
    assert_eq!(
        (at("/var/lib/app").uid, at("/var/lib/app").mode),
        (1000, 0o700)
    );
    assert_eq!(
        at("/var/lib/app/key").also,
        vec![PathBuf::from("/var/lib/app/key-again")]
    );
    assert_eq!(at("/var/lib/key-link").what, "app/key");
    assert_eq!(at("/var/lib/fifo").kind, 'p');
    assert_eq!(at("/usr/local/bin/suid-true").mode, 0o4755);
    assert!(!umoci.contains_key(Path::new("/etc/kiln-base-note")));
    let old: Vec<_> = umoci
        .keys()
        .filter(|k| k.parent() == Some(Path::new("/opt/old")))
        .collect();
    assert_eq!(old, vec![Path::new("/opt/old/only")], "the opaque folder");
    eprintln!("umoci and kiln agree on {} entries", umoci.len());
    home.assert_nothing_left("owners");
}

/// Every path under `root` with its owner, links not followed.
fn walkdir(root: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.push((p.clone(), m.uid()));
        if m.is_dir() {
            todo.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    out
}

#[test]
fn an_image_cannot_bring_device_nodes_or_mount_points_that_lead_out() {
    let home = Home::new();
    // GIVEN kiln's tiny base as a folder, twice changed: a device node of its own (1:5), and a
    // /dev that is a link to a host folder
    let tar = home.tiny_base_tarball();
    let scratch = tempfile::tempdir().expect("scratch");
    let import = |name: &str, change: &str| {
        let root = scratch.path().join(name);
        std::fs::create_dir_all(&root).expect("root");
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("tar -xpf '{}' -C . && {change}", tar.display()))
            .current_dir(&root);
        crate::support::run_ok(sh);
        let (code, out, err) = home.kiln(&["image", "import", name, &root.display().to_string()]);
        assert_eq!(code, 0, "{out}{err}");
    };
    import("with-device", "mkdir -p var && mknod var/zero c 1 5");
    import("linked-dev", "rm -rf dev && ln -s /tmp dev");
    let dir = repo().join("tests/data/embedded/image-guards");
    let pipeline = |parent: &str| {
        let text = std::fs::read_to_string(dir.join("pipeline.yaml"))
            .expect("pipeline")
            .replace("@PARENT@", parent)
            .replace("name: image-guards", &format!("name: on-{parent}"))
            .replace(
                "components/opens-device.yaml",
                &dir.join("components/opens-device.yaml")
                    .display()
                    .to_string(),
            );
        let path = scratch.path().join(format!("{parent}.yaml"));
        std::fs::write(&path, text).expect("write");
        path
    };
    // WHEN a build runs on the image with a device node THEN the node opens nothing (it is no
    // node in the instance: device entries are layer metadata only)
    let (code, summary, err) = home.run(&pipeline("with-device"));
    assert_eq!(code, 0, "{summary}\n{err}");
    // AND the image the build made still holds the entry
    let built = summary["images"]["us-east-1"].as_str().expect("image");
    let (tar, _) = home.files_of("us-east-1", built);
    let mut list = Command::new("tar");
    list.args(["--numeric-owner", "-tvf"]).arg(&tar);
    let listed = crate::support::run_ok(list);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('c') && l.contains("1,5") && l.ends_with("var/zero")),
        "{listed}"
    );
    home.assert_nothing_left("on-with-device");
    // WHEN a build runs on the image whose /dev is a link THEN its builder does not start, and
    // the reason names the link
    let (code, summary, err) = home.run(&pipeline("linked-dev"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert!(
        summary.to_string().contains("/dev is a symbolic link"),
        "{summary}"
    );
    home.assert_nothing_left("on-linked-dev");
}

/// The customize and test command scripts of #14, exactly as kiln sends them to SSM
/// (`AwsPorts::command_script`), run by bash on embedded instances of kiln-tiny whose network is
/// the host's, with moto's S3 behind the presigned URLs: the real agent fetched, checked against
/// its pin and run; a parameter full of shell syntax stays a value.
mod ssm_scripts {
    use super::*;
    use kiln::aws::{AwsPorts, Settings};
    use kiln::component::PhaseName;
    use kiln::model::build::BuildId;
    use kiln::model::pipeline::SanitizeItem;
    use kiln::ports::{CommandPlan, ComponentSpec};
    use serde_json::json;

    const BUCKET: &str = "kiln-scripts";
    /// What a builder leaves that no image should carry (planted before the customize script).
    const PLANT: &[&str] = &[
        "mkdir -p /etc/ssh /var/lib/cloud/instances/i-0builder /var/lib/amazon/ssm/i-0builder /var/log/amazon/ssm /root/.ssh",
        "echo builder-private-key > /etc/ssh/ssh_host_ed25519_key",
        "echo 'ssh-ed25519 AAAAbuilder' > /etc/ssh/ssh_host_ed25519_key.pub",
        "echo 'ssh-rsa AAAAkeypair builder' > /root/.ssh/authorized_keys",
        "echo 0123456789abcdef0123456789abcdef > /etc/machine-id",
        "echo 'export AWS_SECRET_ACCESS_KEY=typed-by-hand' > /root/.bash_history",
        "echo pickled > /var/lib/cloud/instances/i-0builder/obj.pkl",
        "ln -sfn /var/lib/cloud/instances/i-0builder /var/lib/cloud/instance",
        "echo 'ssm agent log' > /var/log/amazon/ssm/amazon-ssm-agent.log",
        "echo state > /var/lib/amazon/ssm/i-0builder/document",
        "echo junk > /tmp/builder-junk",
        "echo junk > /var/tmp/builder-junk",
    ];
    /// The value of the component's parameter: every kind of shell syntax.
    const HOSTILE: &str =
        "$(touch /pwned-subst); `touch /pwned-tick` && touch /pwned-and | 'q' \"dq\" \\ $HOME";

    struct Aws {
        _moto: crate::support::Moto,
        rt: tokio::runtime::Runtime,
        ports: AwsPorts,
    }

    fn aws() -> Aws {
        let moto = crate::support::Moto::start();
        for (k, v) in moto.env() {
            // Each nextest test runs in its own process: the environment is this test's alone.
            std::env::set_var(k, v);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let settings = Settings {
            table: String::new(),
            bucket: BUCKET.into(),
            event_bus: String::new(),
            region: "us-east-1".into(),
            stack: None,
            instance_profile: None,
        };
        let ports = rt.block_on(AwsPorts::from_env(settings));
        // As `kiln run --backend aws` does: the bucket, this checkout's agent uploaded and pinned.
        rt.block_on(ports.prepare_artifacts(&built_binary("kiln-agent")))
            .expect("artifacts");
        Aws {
            _moto: moto,
            rt,
            ports,
        }
    }

    impl Aws {
        fn object(&self, key: &str) -> Option<Vec<u8>> {
            let s3 =
                aws_sdk_s3::Client::from_conf(
                    aws_sdk_s3::config::Builder::from(&self.rt.block_on(
                        aws_config::defaults(aws_config::BehaviorVersion::latest()).load(),
                    ))
                    .force_path_style(true)
                    .build(),
                );
            self.rt.block_on(async {
                let out = s3.get_object().bucket(BUCKET).key(key).send().await.ok()?;
                Some(out.body.collect().await.ok()?.into_bytes().to_vec())
            })
        }

        fn report(&self, build: &BuildId, kind: &str) -> Json {
            let bytes = self
                .object(&format!("builds/{build}/{kind}/report.json"))
                .unwrap_or_else(|| panic!("no {kind} report in the bucket"));
            serde_json::from_slice(&bytes).expect("report JSON")
        }

        fn scripts(&self, build: &BuildId) -> (Vec<String>, Vec<String>) {
            let app = ComponentSpec {
                name: "app-config".into(),
                document: json!({"name": "app-config", "schemaVersion": "1.0",
                    "parameters": [{"Value": {"type": "string"}}],
                    "phases": [{"name": "build", "steps": [{"name": "Write", "action": "CreateFile",
                        "inputs": [{"path": "/etc/app.conf", "content": "{{ Value }}"}]}]}]}),
                parameters: [("Value".to_string(), HOSTILE.to_string())].into(),
            };
            let check = ComponentSpec {
                name: "app-config-test".into(),
                document: json!({"name": "app-config-test", "schemaVersion": "1.0",
                    "parameters": [{"Value": {"type": "string"}}],
                    "phases": [{"name": "test", "steps": [
                        {"name": "Read", "action": "ExecuteBash", "inputs": {"commands": ["cat /etc/app.conf"]}},
                        {"name": "Same", "action": "Assert", "inputs": {"stringEquals": "{{ Value }}",
                            "value": "{{ test.Read.outputs.stdout }}"}}]}]}),
                parameters: [("Value".to_string(), HOSTILE.to_string())].into(),
            };
            let customize = CommandPlan {
                build: build.clone(),
                phases: vec![PhaseName::Build, PhaseName::Validate],
                components: vec![app],
                working_directory: "/tmp".into(),
                sanitize: SanitizeItem::ALL.to_vec(),
                verify_clean: None,
                timeout_minutes: 30,
            };
            let test = CommandPlan {
                build: build.clone(),
                phases: vec![PhaseName::Test],
                components: vec![check],
                working_directory: "/tmp".into(),
                sanitize: Vec::new(),
                verify_clean: Some(SanitizeItem::ALL.to_vec()),
                timeout_minutes: 30,
            };
            let c = self.rt.block_on(self.ports.command_script(&customize));
            let t = self.rt.block_on(self.ports.command_script(&test));
            let (c, t) = (c.expect("customize script"), t.expect("test script"));
            // Every URL lives the stage's timeout (30 min) and five minutes, not S3's default.
            let lifetimes: Vec<&str> = c
                .iter()
                .chain(&t)
                .flat_map(|line| line.split("X-Amz-Expires=").skip(1))
                .map(|rest| rest.split('&').next().unwrap_or_default())
                .collect();
            assert!(!lifetimes.is_empty(), "no presigned URL in the scripts");
            assert!(
                lifetimes.iter().all(|l| *l == "2100"),
                "URL lifetimes {lifetimes:?}"
            );
            (c, t)
        }
    }

    fn bash_component(name: &str, phase: &str, lines: &[String]) -> String {
        serde_json::to_string(&json!({"name": name, "schemaVersion": "1.0", "phases": [{"name": phase,
            "steps": [{"name": "Script", "action": "ExecuteBash", "inputs": {"commands": lines}}]}]}))
        .expect("JSON")
    }

    /// A pipeline whose builder runs the planted files, the customize script (and `after`), and
    /// whose test instance runs the test script.
    fn pipeline(
        home: &Home,
        name: &str,
        customize: &[String],
        after: &[&str],
        test: &[String],
    ) -> PathBuf {
        let dir = home.path().join(format!("p-{name}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        std::fs::write(
            dir.join("plant.json"),
            bash_component("plant", "build", &own(PLANT)),
        )
        .expect("write");
        std::fs::write(
            dir.join("customize.json"),
            bash_component("ssm-customize", "build", customize),
        )
        .expect("write");
        let after = if after.is_empty() {
            &["true"][..]
        } else {
            after
        };
        std::fs::write(
            dir.join("after.json"),
            bash_component("after", "build", &own(after)),
        )
        .expect("write");
        std::fs::write(
            dir.join("test.json"),
            bash_component("ssm-test", "test", test),
        )
        .expect("write");
        let file = dir.join("pipeline.yaml");
        std::fs::write(
            &file,
            format!(
                "name: {name}\nversion: 1.0.0\nparent:\n  local: kiln-tiny\ncomponents:\n  - path: plant.json\n  - path: customize.json\n  - path: after.json\ntests:\n  components:\n    - path: test.json\ninfrastructure:\n  network: host\ndistribution:\n  - region: us-east-1\n"
            ),
        )
        .expect("write");
        file
    }

    /// The content of `name` in the tarball, which must hold it.
    fn tar_entry(tar: &Path, name: &str) -> Vec<u8> {
        let list = Command::new("tar")
            .arg("-tf")
            .arg(tar)
            .output()
            .expect("tar");
        let entry = String::from_utf8_lossy(&list.stdout)
            .lines()
            .find(|l| l.trim_start_matches("./") == name)
            .unwrap_or_else(|| panic!("{name} is not in {}", tar.display()))
            .to_string();
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(tar)
            .arg(&entry)
            .output()
            .expect("tar");
        assert!(out.status.success(), "tar -xOf {entry}");
        out.stdout
    }

    /// A home, moto with the agent pinned, a build id and its two scripts.
    fn setup() -> (Home, Aws, BuildId, Vec<String>, Vec<String>) {
        let home = Home::new();
        let aws = aws();
        let build = BuildId::new_at(chrono::Utc::now().timestamp_millis() as u64);
        let (customize, test) = aws.scripts(&build);
        (home, aws, build, customize, test)
    }

    #[test]
    fn leave_nothing_of_kiln_sanitize_the_image_and_the_test_instance_proves_it() {
        let (home, aws, build, customize, test) = setup();
        // GIVEN the scripts hold the build id, pins and quoted URLs, and none of the values
        let text = customize.join("\n") + &test.join("\n");
        assert!(!text.contains("touch /pwned"), "a value reached the script");
        assert!(
            text.contains(&kiln::digest::sha256_file(&built_binary("kiln-agent")).expect("sha"))
        );
        // WHEN a build runs them on its builder and its test instance
        let file = pipeline(&home, "ssm-clean", &customize, &[], &test);
        let (code, summary, err) = home.run(&file);
        // THEN it is AVAILABLE: the agent ran both, and the test instance found the image clean
        assert_eq!(code, 0, "{summary}\n{err}");
        let report = aws.report(&build, "customize");
        let docs: Vec<&str> = report["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["name"].as_str())
            .collect();
        assert_eq!(docs, ["app-config", "kiln-sanitize"], "{report}");
        let report = aws.report(&build, "test");
        assert_eq!(report["status"], "success", "{report}");
        assert_eq!(
            report["documents"][0]["name"], "kiln-clean-image",
            "{report}"
        );
        let checked: Vec<&str> = report["documents"][0]["phases"][0]["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(checked.len(), 1 + SanitizeItem::ALL.len(), "{checked:?}");
        // AND the record names what the builder removed, by path and digest only
        let record: Json = serde_json::from_slice(
            &aws.object(&format!("builds/{build}/customize/sanitized.json"))
                .expect("record"),
        )
        .expect("record JSON");
        let removed: Vec<&str> = record["removed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["path"].as_str())
            .collect();
        for p in [
            "/etc/ssh/ssh_host_ed25519_key",
            "/root/.bash_history",
            "/etc/machine-id",
            "/var/lib/cloud/instances/i-0builder/obj.pkl",
        ] {
            assert!(removed.contains(&p), "{p} not in {removed:?}");
        }
        assert!(!String::from_utf8_lossy(
            &aws.object(&format!("builds/{build}/customize/sanitized.json"))
                .unwrap()
        )
        .contains("typed-by-hand"));
        // AND the image holds nothing of kiln, none of the builder's files, and the value as text
        let image = summary["images"]["us-east-1"].as_str().expect("image");
        let (tar, files) = home.files_of("us-east-1", image);
        for gone in [
            "var/lib/kiln",
            "var/lib/kiln-agent",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "root/.ssh/authorized_keys",
            "root/.bash_history",
            "var/lib/cloud/instance",
            "var/lib/cloud/instances/i-0builder",
            "var/lib/amazon/ssm/i-0builder",
            "var/log/amazon/ssm/amazon-ssm-agent.log",
            "tmp/builder-junk",
            "var/tmp/builder-junk",
        ] {
            assert!(
                !files
                    .iter()
                    .any(|f| f == gone || f.starts_with(&format!("{gone}/"))),
                "{gone} is in the image"
            );
        }
        assert!(
            !files.iter().any(|f| f.contains("pwned")),
            "a value ran: {files:?}"
        );
        assert_eq!(tar_entry(&tar, "etc/machine-id"), b"");
        assert_eq!(
            String::from_utf8_lossy(&tar_entry(&tar, "etc/app.conf")),
            HOSTILE
        );
        home.assert_nothing_left("ssm-clean");
    }

    #[test]
    fn a_builder_file_back_in_the_image_fails_the_clean_image_test() {
        let (home, aws, build, customize, test) = setup();
        // GIVEN a component after the customize script that puts the builder's host key back
        let file = pipeline(
            &home,
            "ssm-dirty",
            &customize,
            &["echo builder-private-key > /etc/ssh/ssh_host_ed25519_key"],
            &test,
        );
        // WHEN the build runs
        let (code, summary, err) = home.run(&file);
        // THEN the test fails, and its report names kiln-clean-image and the item
        assert_eq!(code, 1, "{summary}\n{err}");
        assert_eq!(summary["failure"]["error"], "Kiln.TestFailed", "{summary}");
        let report = aws.report(&build, "test");
        assert_eq!(
            report["failure"]["document"], "kiln-clean-image",
            "{report}"
        );
        assert_eq!(report["failure"]["step"], "ssh-host-keys", "{report}");
        assert!(report["failure"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/etc/ssh/ssh_host_ed25519_key is the builder's")));
        assert_eq!(
            report["documents"].as_array().map(Vec::len),
            Some(1),
            "no test ran on a dirty image: {report}"
        );
        home.assert_nothing_left("ssm-dirty");
    }

    #[test]
    fn a_tampered_agent_in_the_bucket_is_refused_before_it_runs() {
        let (home, aws, build, customize, test) = setup();
        // GIVEN someone who can write the bucket replaced the agent
        let evil = home.path().join("evil-agent");
        std::fs::write(&evil, "#!/bin/sh\ntouch /tampered-agent-ran\nexit 0\n").expect("write");
        aws.rt
            .block_on(aws.ports.upload_agent(&evil, std::env::consts::ARCH))
            .expect("upload");
        // WHEN the build runs the scripts pinned to the real agent
        let file = pipeline(&home, "ssm-tampered", &customize, &[], &test);
        let (code, summary, err) = home.run(&file);
        // THEN customize fails naming the pin, and the replaced agent never ran
        assert_eq!(code, 1, "{summary}\n{err}");
        assert_eq!(
            summary["failure"]["error"], "Kiln.ComponentFailed",
            "{summary}"
        );
        let message = summary["failure"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("is not the pinned one"), "{message}");
        assert!(aws
            .object(&format!("builds/{build}/customize/report.json"))
            .is_none());
        assert!(home.built_images("us-east-1").is_empty());
        home.assert_nothing_left("ssm-tampered");
    }

    /// A build id that is not a ULID (from a forged state-machine input) never reaches a script.
    #[test]
    fn a_build_id_with_shell_syntax_is_refused() {
        let aws = aws();
        for hostile in [
            "01J0000000000000000000000$(reboot)",
            "x; rm -rf /",
            "../../etc",
            "",
        ] {
            let plan = CommandPlan {
                build: BuildId(hostile.into()),
                phases: vec![PhaseName::Build],
                components: Vec::new(),
                working_directory: "/tmp".into(),
                sanitize: Vec::new(),
                verify_clean: None,
                timeout_minutes: 30,
            };
            let err = aws
                .rt
                .block_on(aws.ports.command_script(&plan))
                .expect_err(hostile);
            assert_eq!(
                err.code.as_deref(),
                Some("InvalidBuildId"),
                "{hostile}: {err}"
            );
        }
    }
}
