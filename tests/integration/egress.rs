//! What a `network: private` instance may reach, and what its limits hold, proven from inside
//! real instances, as root. No traffic leaves this machine: the destinations are stub listeners
//! on a dummy interface the test creates (the metadata service's link-local address and an
//! RFC 1918 address) and on the host's own address. Every refusal has its positive control:
//! the same probe connects from `network: host` and through `allow:`, and the same fork bomb and
//! memory hog succeed under a higher limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::embedded::{file_in_tar, home_of, host_address, kiln_as, top_layer, Home};
use crate::support::{built_binary, run_ok};

/// The dummy interface the network test creates, and the addresses it carries.
const DUMMY: &str = "kilntest0";
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);

/// `kilntest0`, a dummy interface with the test's addresses; removed when dropped, also when
/// the test fails.
struct Dummy;

impl Dummy {
    fn create() -> Dummy {
        // A leftover of a killed run first.
        let _ = Command::new("ip").args(["link", "del", DUMMY]).output();
        let ip = |args: &[&str]| {
            let mut c = Command::new("ip");
            c.args(args);
            run_ok(c);
        };
        // A dummy interface; a bridge without ports where the kernel has no dummy driver (as
        // this machine's): either only carries addresses of this machine.
        let dummy = Command::new("ip")
            .args(["link", "add", DUMMY, "type", "dummy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !dummy {
            ip(&["link", "add", DUMMY, "type", "bridge"]);
        }
        let guard = Dummy;
        for a in [METADATA, PRIVATE] {
            ip(&["addr", "add", &format!("{a}/32"), "dev", DUMMY]);
        }
        ip(&["link", "set", DUMMY, "up"]);
        guard
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", DUMMY]).output();
    }
}

/// A TCP listener on `ip` that counts the connections it accepts.
struct Stub {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Stub {
    fn on(ip: IpAddr) -> Stub {
        let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
        Stub { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// `ip/port`, as bash's /dev/tcp takes it.
    fn target(&self) -> String {
        format!("{}/{}", self.addr.ip(), self.addr.port())
    }
}

/// kiln-tiny with `nft` and `ip` added (with the libraries they load), imported as the image
/// `egress-base`: the probe needs them to try changing the policy from inside.
fn egress_base(home: &Home) {
    let tar = home.tiny_base_tarball();
    let root = home.path().join("egress-root");
    std::fs::create_dir_all(&root).expect("root");
    run_ok({
        let mut c = Command::new("tar");
        c.arg("-xf").arg(&tar).arg("-C").arg(&root);
        c
    });
    for program in ["nft", "ip"] {
        let path = kiln::confine::find_program(program)
            .unwrap_or_else(|| panic!("{program} is not installed (make setup)"));
        let ldd = run_ok({
            let mut c = Command::new("ldd");
            c.arg(&path);
            c
        });
        let libs = ldd
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(PathBuf::from);
        for file in std::iter::once(path.clone()).chain(libs) {
            let real = std::fs::canonicalize(&file).expect("canonicalize");
            for at in [&file, &real] {
                let target = root.join(at.strip_prefix("/").expect("absolute"));
                if std::fs::symlink_metadata(&target).is_err() {
                    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
                    std::fs::copy(&real, &target).expect("copy");
                }
            }
        }
    }
    let (code, out, err) = home.kiln(&[
        "image",
        "import",
        "egress-base",
        &root.display().to_string(),
        "--region",
        "us-east-1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A pipeline of `parent` whose one component runs `script` (which writes key=value lines to
/// /var/lib/probe.txt), with `infrastructure` as its infrastructure block.
fn pipeline(home: &Home, parent: &str, infrastructure: &str, script: &str) -> PathBuf {
    // A new version for each pipeline of a home: kiln refuses another content under one, and
    // a script of its own, or kiln would skip a build whose image it already has.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let version = RUNS.fetch_add(1, Ordering::SeqCst);
    let indented: String = format!("# run {version}\n{script}")
        .lines()
        .map(|l| format!("                    {l}\n"))
        .collect();
    let text = format!(
        "name: egress\nversion: 1.0.{version}\nparent:\n  local: {parent}\ncomponents:\n  - inline:\n      name: probe\n      schemaVersion: 1.0\n      phases:\n        - name: build\n          steps:\n            - name: Probe\n              action: ExecuteBash\n              inputs:\n                commands:\n                  - |\n{indented}infrastructure:\n{infrastructure}distribution:\n  - region: us-east-1\n"
    );
    let path = home.path().join("egress-pipeline.yaml");
    std::fs::write(&path, text).expect("write");
    path
}

/// Runs `pipeline` and returns the probe's key=value lines, read from the image it built.
fn probe(home: &Home, pipeline: &Path) -> std::collections::BTreeMap<String, String> {
    let (code, summary, err) = home.run(pipeline);
    assert_eq!(code, 0, "{summary}\n{err}");
    let id = summary["images"]["us-east-1"]
        .as_str()
        .unwrap_or_else(|| panic!("no image: {summary}"));
    let tar = home.path().join("probe-layer.tar");
    top_layer(&home.layout("us-east-1").dir, id, &tar);
    file_in_tar(&tar, "var/lib/probe.txt")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// For each `name=ip/port`: whether a TCP connect succeeded and how many milliseconds it
/// took (`name=yes 3`); then whether the policy could be flushed and the route removed.
const CONNECT_PROBE: &str = r#"out=/var/lib/probe.txt
: > "$out"
for t in @TARGETS@; do
  n=${t%%=*}; a=${t#*=}
  s=$(date +%s%N)
  if timeout 5 bash -c "exec 3<>/dev/tcp/$a" 2>/dev/null; then r=yes; else r=no; fi
  e=$(date +%s%N)
  echo "$n=$r $(( (e - s) / 1000000 ))" >> "$out"
done
echo "have_nft=$(command -v nft)" >> "$out"
echo "have_ip=$(command -v ip)" >> "$out"
if nft flush ruleset 2>/dev/null; then echo nft_flush=yes; else echo nft_flush=no; fi >> "$out"
if ip route del default 2>/dev/null; then echo route_del=yes; else echo route_del=no; fi >> "$out"
# Time for the test to see slirp4netns's cgroup while the instance runs.
sleep 1
"#;

/// Watches slirp4netns processes (by executable, not command line) until stopped: the v1/v2
/// cgroup lines of each one seen.
fn watch_slirp(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
                let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
                if exe.file_name().is_some_and(|n| n == "slirp4netns") {
                    if let Ok(c) = std::fs::read_to_string(e.path().join("cgroup")) {
                        let pids = c
                            .lines()
                            .find(|l| l.contains(":pids:") || l.starts_with("0::"))
                            .unwrap_or("")
                            .to_string();
                        if !seen.contains(&pids) {
                            seen.push(pids);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

#[test]
fn a_private_network_refuses_link_local_private_and_host_addresses_at_once_unless_allowed() {
    let home = Home::new();
    egress_base(&home);
    // GIVEN stub listeners on the metadata service's address, an RFC 1918 address (both on a
    // dummy interface of this machine) and the host's own address
    let _dummy = Dummy::create();
    let metadata = Stub::on(IpAddr::V4(METADATA));
    let private = Stub::on(IpAddr::V4(PRIVATE));
    let host = Stub::on(IpAddr::V4(host_address()));
    let stubs = [
        ("metadata", &metadata),
        ("rfc1918", &private),
        ("host", &host),
    ];
    let targets: Vec<String> = stubs
        .iter()
        .map(|(n, s)| format!("{n}={}", s.target()))
        .collect();
    let script = CONNECT_PROBE.replace("@TARGETS@", &targets.join(" "));
    let accepted = || stubs.iter().map(|(_, s)| s.accepted()).collect::<Vec<_>>();

    // WHEN the probe runs in a default (private) instance
    let stop = Arc::new(AtomicBool::new(false));
    let slirp = watch_slirp(stop.clone());
    let p = pipeline(&home, "egress-base", "  network: private\n", &script);
    let inside = probe(&home, &p);
    stop.store(true, Ordering::SeqCst);
    let slirp_cgroups = slirp.join().expect("watcher");
    // THEN every connect is refused, each within 1 s (a reset, not a timeout), and no stub
    // saw a connection
    for (name, _) in &stubs {
        let (result, ms) = inside[*name].split_once(' ').expect("result and time");
        assert_eq!(result, "no", "{name}: {inside:?}");
        let ms: u64 = ms.parse().expect("ms");
        assert!(ms < 1000, "{name} took {ms} ms to be refused: {inside:?}");
        eprintln!("{name}: refused in {ms} ms");
    }
    assert_eq!(accepted(), [0, 0, 0], "{inside:?}");
    // AND the policy is out of the instance's reach: the tools are there, and refused
    assert!(inside["have_nft"].ends_with("/nft"), "{inside:?}");
    assert!(inside["have_ip"].ends_with("/ip"), "{inside:?}");
    assert_eq!(inside["nft_flush"], "no", "{inside:?}");
    assert_eq!(inside["route_del"], "no", "{inside:?}");
    // AND slirp4netns ran in the instance's cgroup
    assert!(!slirp_cgroups.is_empty(), "no slirp4netns seen");
    assert!(
        slirp_cgroups.iter().all(|c| c.contains("/kiln/i-")),
        "slirp4netns outside the instance's cgroup: {slirp_cgroups:?}"
    );
    home.assert_nothing_left("egress");

    // AND the same probe with `network: host` reaches each stub: the refusals above are the
    // policy's, not a missing route or tool
    let p = pipeline(&home, "egress-base", "  network: host\n", &script);
    let open = probe(&home, &p);
    for (name, _) in &stubs {
        assert!(open[*name].starts_with("yes "), "{name}: {open:?}");
    }
    assert_eq!(accepted(), [1, 1, 1], "{open:?}");
    home.assert_nothing_left("egress");

    // AND a private instance whose `allow:` names the destinations reaches each of them, in
    // each form (a CIDR, an address, host:port)
    let infrastructure = format!(
        "  network:\n    mode: private\n    allow:\n      - 169.254.169.0/24\n      - {}\n      - {}\n",
        private.addr.ip(),
        host.addr
    );
    let p = pipeline(&home, "egress-base", &infrastructure, &script);
    let allowed = probe(&home, &p);
    for (name, _) in &stubs {
        assert!(allowed[*name].starts_with("yes "), "{name}: {allowed:?}");
    }
    assert_eq!(accepted(), [2, 2, 2], "{allowed:?}");
    home.assert_nothing_left("egress");

    // AND a privileged private instance can flush the policy and remove the route: the same
    // commands work where CAP_NET_ADMIN is kept
    let p = pipeline(
        &home,
        "egress-base",
        "  network: private\n  privileged: true\n",
        &script,
    );
    let privileged = probe(&home, &p);
    assert_eq!(privileged["nft_flush"], "yes", "{privileged:?}");
    assert_eq!(privileged["route_del"], "yes", "{privileged:?}");
    home.assert_nothing_left("egress");
}

/// Bomb, then hog: 5,000 sleeps started in the background (how many started is counted with
/// builtins only, since forks fail once the limit is reached), then 1 GiB held by `tail`.
const LIMITS_PROBE: &str = r#"out=/var/lib/probe.txt
: > "$out"
rm -f /tmp/started
( for i in $(seq 5000); do sleep 60 & echo $! >> /tmp/started; done ) 2>/dev/null
mapfile -t started < /tmp/started
echo "started=${#started[@]}" >> "$out"
for p in "${started[@]}"; do kill "$p" 2>/dev/null; done
wait 2>/dev/null
bytes=$(timeout 120 sh -c 'head -c 1073741824 /dev/zero | tail -c 1073741824 | wc -c')
echo "hog_bytes=${bytes:-0}" >> "$out"
"#;

/// A cgroup of the test's own (v1 pids + memory, or v2) that `kiln` runs in: whatever the
/// instance's limits fail to hold, it holds, so a broken guard cannot take the machine down.
struct Guard {
    dirs: Vec<PathBuf>,
}

impl Guard {
    fn create(pids: u64, memory: u64) -> Guard {
        let name = format!("kiln-egress-test-{}", std::process::id());
        let root = Path::new(kiln::confine::CGROUP_ROOT);
        let dirs: Vec<(PathBuf, &str, u64)> = if kiln::confine::is_cgroup2() {
            std::fs::write(root.join("cgroup.subtree_control"), "+pids +memory").ok();
            let d = root.join(&name);
            vec![(d.clone(), "pids.max", pids), (d, "memory.max", memory)]
        } else {
            vec![
                (root.join("pids").join(&name), "pids.max", pids),
                (
                    root.join("memory").join(&name),
                    "memory.limit_in_bytes",
                    memory,
                ),
            ]
        };
        let mut guard = Guard { dirs: Vec::new() };
        for (d, file, value) in dirs {
            std::fs::create_dir_all(&d).expect("guard cgroup");
            if !guard.dirs.contains(&d) {
                guard.dirs.push(d.clone());
            }
            std::fs::write(d.join(file), value.to_string()).expect("guard limit");
        }
        guard
    }

    /// `kiln run` in this cgroup, under `timeout`.
    fn run(&self, home: &Home, pipeline: &Path) -> (i32, serde_json::Value, String) {
        let joins: String = self
            .dirs
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
            .collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{joins}exec timeout 600 \"$0\" --home \"$1\" run \"$2\" --output json"
            ))
            .arg(built_binary("kiln"))
            .arg(home.path())
            .arg(pipeline)
            .env_remove("KILN_AGENT")
            .env_remove("KILN_HOME")
            .output()
            .expect("kiln");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            summary,
            format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Whatever is left in it (a failed run's sleeps) goes first.
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for p in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                // Child cgroups kiln left (a failed run) go too.
                if let Ok(entries) = std::fs::read_dir(d.join("kiln")) {
                    for e in entries.flatten() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                let _ = std::fs::remove_dir(d.join("kiln"));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The probe's results and the keeper's log of the run of `pipeline` in `guard`.
fn limits_probe(
    home: &Home,
    guard: &Guard,
    pipeline: &Path,
) -> (std::collections::BTreeMap<String, String>, String) {
    let (code, summary, err) = guard.run(home, pipeline);
    assert_eq!(code, 0, "{err}");
    let id = summary["images"]["us-east-1"].as_str().expect("image");
    let tar = home.path().join("probe-layer.tar");
    top_layer(&home.layout("us-east-1").dir, id, &tar);
    let results = file_in_tar(&tar, "var/lib/probe.txt")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let keeper = std::fs::read_dir(home.path().join("instances"))
        .expect("instances")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("keeper.log")).unwrap_or_default())
        .collect::<String>();
    (results, keeper)
}

#[test]
fn limits_hold_a_fork_bomb_and_a_memory_hog_in_a_cgroup() {
    // GIVEN a guard cgroup of the test's (6,000 processes, 3 GiB) that kiln runs in
    let guard = Guard::create(6000, 3 << 30);
    let home = Home::new();
    let limited = "  network: none\n  limits:\n    pids: 512\n    memory: 256MiB\n";
    // WHEN 5,000 sleeps and 1 GiB are tried against 512 processes and 256 MiB
    let p = pipeline(&home, "kiln-tiny", limited, LIMITS_PROBE);
    let (bounded, keeper) = limits_probe(&home, &guard, &p);
    // THEN the keeper reports a cgroup (a test that fails, not skips, without one), fewer than
    // 512 sleeps started and the hog did not get its gigabyte
    assert!(
        keeper.contains("limits: cgroup") && keeper.contains("pids.max=512"),
        "{keeper}"
    );
    let started: u64 = bounded["started"].parse().expect("started");
    assert!((1..512).contains(&started), "{bounded:?}");
    let bytes: u64 = bounded["hog_bytes"].parse().expect("bytes");
    assert!(bytes < 1 << 30, "{bounded:?}");
    eprintln!("bounded: {started} sleeps, {bytes} bytes");
    home.assert_nothing_left("egress");

    // AND with a higher limit the same counts succeed: the bounds above are the limits'
    let home = Home::new();
    let higher = "  network: none\n  limits:\n    pids: 5500\n    memory: 2GiB\n";
    let p = pipeline(&home, "kiln-tiny", higher, LIMITS_PROBE);
    let (open, keeper) = limits_probe(&home, &guard, &p);
    assert!(keeper.contains("pids.max=5500"), "{keeper}");
    assert_eq!(open["started"], "5000", "{open:?}");
    assert_eq!(open["hog_bytes"], (1u64 << 30).to_string(), "{open:?}");
    home.assert_nothing_left("egress");
}

#[test]
fn an_instance_without_a_cgroup_is_refused_with_exit_2_unless_the_pipeline_says_limits_none() {
    // GIVEN a user of this machine to whom root delegated no cgroup (nobody)
    let nobody = (65534, 65534);
    let dir = home_of(nobody);
    let home = dir.path().join("home");
    let write = |infrastructure: &str| {
        let path = dir.path().join("pipeline.yaml");
        std::fs::write(&path, format!("name: bounded\nversion: 1.0.0\nparent:\n  local: kiln-tiny\ncomponents:\n  - inline:\n      name: c\n      schemaVersion: 1.0\n      phases:\n        - name: build\n          steps:\n            - name: s\n              action: ExecuteBash\n              inputs:\n                commands: [\"true\"]\ninfrastructure:\n{infrastructure}distribution:\n  - region: us-east-1\n")).expect("write");
        std::os::unix::fs::chown(&path, Some(nobody.0), Some(nobody.1)).expect("chown");
        path.display().to_string()
    };
    // WHEN it runs a pipeline with the default limits
    let pipeline = write("  network: none\n");
    let (code, out, err) = kiln_as(nobody, &home, &["run", &pipeline]);
    // THEN exit 2 before anything is made, naming the cgroup it lacked and the opt-out
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("no cgroup") && err.contains("infrastructure.limits: none"),
        "{err}"
    );
    assert!(!home.exists(), "the home was created");
    // AND with `limits: none` the same run gets past that check and builds
    let pipeline = write("  network: none\n  limits: none\n");
    let (code, out, err) = kiln_as(nobody, &home, &["run", &pipeline, "--output", "json"]);
    assert!(!err.contains("no cgroup"), "{err}");
    assert_eq!(code, 0, "{out}{err}");
}
