//! The embedded mode's benchmark (`make bench`, as root), measured in one run with the real
//! `kiln` binary:
//! - orchestration overhead of `kiln run examples/hello`: wall time minus the time inside
//!   component steps (the agents' reports) and image writing (snapshot and copies);
//! - snapshot throughput: a build's snapshot of an instance whose overlay upper dir holds a
//!   folder of real files (tar + zstd level 3 + digests, as the build record times it) against
//!   `tar -c | zstd -3 -T<kiln's workers>` of the same folder; and the measure before it
//!   (`kiln image import DIR` against single-threaded `zstd -3`), printed beside;
//! - the second region's cost (a copy by digest) as a fraction of the first (the snapshot);
//! - what the sandbox's posture costs: the same build with `infrastructure.privileged: true`
//!   (no capability drop, seccomp filter, masks or cgroup: the sandbox as it was before them),
//!   and the default private network (slirp4netns) instead of hello's `network: none`, runs
//!   interleaved.
//!
//! Usage: kiln-embedded-bench KILN REPO

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sh(script: &str) {
    let ok = Command::new("bash")
        .args(["-c", script])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{script}` failed");
}

fn kiln(bin: &Path, home: &Path, args: &[&str]) -> (Duration, String) {
    let start = Instant::now();
    let out = Command::new(bin)
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("kiln runs");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (took, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Seconds the agents spent running the build's components and tests.
fn step_seconds(home: &Path, build: &str) -> f64 {
    let mut total = 0.0;
    for instance in std::fs::read_dir(home.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let record: Json = std::fs::read(instance.path().join("instance.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if record["tags"]["kiln:build-id"] != build {
            continue;
        }
        for cmd in std::fs::read_dir(instance.path().join("cmd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let report: Json = std::fs::read(cmd.path().join("report.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            total += report["durationSeconds"].as_f64().unwrap_or(0.0);
        }
    }
    total
}

fn main() {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(bin), Some(repo)) = (args.next(), args.next()) else {
        eprintln!("usage: kiln-embedded-bench KILN REPO");
        std::process::exit(2);
    };
    let work = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    let home = work.join("home");
    std::fs::create_dir_all(&home).expect("work dir");
    // examples/hello, rebuilt every time (startCondition always).
    let example = work.join("hello");
    sh(&format!(
        "cp -r {}/examples/hello {} && sed -i 's/startCondition: onChange/startCondition: always/' {}/pipeline.yaml",
        repo.display(),
        example.display(),
        example.display()
    ));
    let pipeline = example.join("pipeline.yaml").display().to_string();
    kiln(&bin, &home, &["run", &pipeline, "--output", "json"]); // warm-up: creates kiln-tiny
    let (mut wall, mut steps, mut io, mut overhead) = (vec![], vec![], vec![], vec![]);
    let (mut snapshot, mut copy, mut copied) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let (took, out) = kiln(&bin, &home, &["run", &pipeline, "--output", "json"]);
        let s: Json = serde_json::from_str(&out).expect("summary");
        let w = took.as_secs_f64();
        let st = step_seconds(&home, s["build"].as_str().unwrap_or_default());
        let i = s["imageWriteSeconds"].as_f64().unwrap_or(0.0);
        wall.push(w);
        steps.push(st);
        io.push(i);
        overhead.push(w - st - i);
        for j in s["imageJobs"].as_array().into_iter().flatten() {
            let secs = j["seconds"].as_f64().unwrap_or(0.0);
            if j["kind"] == "snapshot" {
                snapshot.push(secs);
            } else {
                copy.push(secs);
                copied.push(j["bytes"].as_f64().unwrap_or(0.0));
            }
        }
    }
    println!("embedded examples/hello, median of {RUNS} runs (kiln-tiny already made):");
    println!(
        "  wall {:.3} s = component steps {:.3} s + image writing {:.3} s + orchestration {:.3} s ({:.0}% of wall)",
        median(wall.clone()),
        median(steps),
        median(io),
        median(overhead.clone()),
        100.0 * median(overhead) / median(wall)
    );
    println!(
        "  second region: copy {:.4} s ({:.0} bytes copied, shared blobs skipped) = {:.2}x the snapshot in the first region ({:.4} s)",
        median(copy.clone()),
        median(copied),
        median(copy) / median(snapshot.clone()),
        median(snapshot)
    );

    // The isolation's cost: the same build without the posture (privileged) and with the
    // default private network (slirp4netns) instead of hello's `network: none`, interleaved.
    let variant = |name: &str, sed: &str, check: &str| {
        let dir = work.join(name);
        sh(&format!(
            "cp -r {} {o} && sed -i {sed} -e 's/^name: hello$/name: {name}/' {o}/pipeline.yaml && {check} {o}/pipeline.yaml",
            example.display(),
            o = dir.display()
        ));
        dir.join("pipeline.yaml").display().to_string()
    };
    let open_pipeline = variant(
        "hello-open",
        "-e 's/^infrastructure:$/infrastructure:\\n  privileged: true/'",
        "grep -q 'privileged: true'",
    );
    let private_pipeline = variant(
        "hello-private",
        "-e '/^  network: none$/d'",
        "! grep -q 'network: none'",
    );
    kiln(&bin, &home, &["run", &open_pipeline, "--output", "json"]); // warm-up
    kiln(&bin, &home, &["run", &private_pipeline, "--output", "json"]);
    let (mut closed_wall, mut private_wall, mut open_wall) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        for (p, into) in [
            (&pipeline, &mut closed_wall),
            (&private_pipeline, &mut private_wall),
            (&open_pipeline, &mut open_wall),
        ] {
            let (took, _) = kiln(&bin, &home, &["run", p, "--output", "json"]);
            into.push(took.as_secs_f64());
        }
    }
    let (c, n, o) = (median(closed_wall), median(private_wall), median(open_wall));
    // What a second region adds to a whole build: hello as it is (two regions) against the same
    // pipeline distributing to its first region only, interleaved.
    let one_region = variant(
        "hello-one-region",
        "-e '/^  - region: eu-west-1$/,/^$/d'",
        "! grep -q eu-west-1",
    );
    kiln(&bin, &home, &["run", &one_region, "--output", "json"]); // warm-up
    let (mut two_wall, mut one_wall) = (vec![], vec![]);
    for _ in 0..RUNS {
        two_wall.push(
            kiln(&bin, &home, &["run", &pipeline, "--output", "json"])
                .0
                .as_secs_f64(),
        );
        one_wall.push(
            kiln(&bin, &home, &["run", &one_region, "--output", "json"])
                .0
                .as_secs_f64(),
        );
    }
    let (two, one) = (median(two_wall), median(one_wall));
    println!(
        "second region, whole build: two regions {two:.3} s vs one {one:.3} s: {:.3}x, {:+.1} ms",
        two / one,
        (two - one) * 1000.0
    );
    println!("sandbox isolation, examples/hello (2 instances), median of {RUNS} interleaved runs, against privileged (no posture) with network none {o:.3} s:");
    println!(
        "  posture, network none {c:.3} s: {:.3}x, {:+.1} ms per instance",
        c / o,
        (c - o) * 1000.0 / 2.0
    );
    println!(
        "  posture, network private (slirp4netns, the default) {n:.3} s: {:.3}x, {:+.1} ms per instance",
        n / o,
        (n - o) * 1000.0 / 2.0
    );

    // Snapshot throughput, as a build snapshots: an instance whose component copied a folder of
    // real files (/usr/include and /usr/lib/gcc, in its parent under /data) to /opt/copy, so the
    // instance's overlay upper dir holds them; the build record's snapshot job is timed.
    let tree = work.join("tree");
    sh(&format!(
        "mkdir -p {t} && cp -a /usr/include {t}/include && cp -a /usr/lib/gcc {t}/gcc",
        t = tree.display()
    ));
    let bytes: u64 = Command::new("du")
        .args(["-sb"])
        .arg(&tree)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let tree_s = tree.display().to_string();
    let root = work.join("bench-parent");
    let tiny = work.join("kiln-tiny.tar");
    kiln(
        &bin,
        &home,
        &["image", "export", "kiln-tiny", &tiny.display().to_string()],
    );
    sh(&format!(
        "mkdir -p {r} && tar -xf {tiny} -C {r} && cp -a {tree_s} {r}/data",
        r = root.display(),
        tiny = tiny.display()
    ));
    kiln(
        &bin,
        &home,
        &[
            "image",
            "import",
            "bench-parent",
            &root.display().to_string(),
        ],
    );
    let copier = work.join("snapshot-bench");
    std::fs::create_dir_all(&copier).expect("bench pipeline folder");
    std::fs::write(
        copier.join("copy.yaml"),
        "name: copy-data\ndescription: Copies /data to /opt/copy, into the instance's upper dir.\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Copy\n        action: ExecuteBash\n        inputs:\n          commands:\n            - mkdir -p /opt/copy && cp -a /data/. /opt/copy/\n",
    )
    .expect("component");
    std::fs::write(
        copier.join("pipeline.yaml"),
        "name: snapshot-bench\nversion: 1.0.0\nparent:\n  local: bench-parent\ncomponents:\n  - path: copy.yaml\ntests:\n  enabled: false\ninfrastructure:\n  network: none\n  limits: none\ndistribution:\n  - region: us-east-1\n    amiName: \"snapshot-bench-{{ kiln:buildNumber }}\"\nschedule:\n  startCondition: always\n",
    )
    .expect("pipeline");
    let copier = copier.join("pipeline.yaml").display().to_string();
    // At kiln's thread count: its layer writer compresses in as many zstd workers as there are
    // cores (shared/src/local/layer.rs), as `zstd -T0` does.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = work.join("baseline.tar.zst");
    let baseline = |threads: usize| {
        format!(
            "tar -cf - -C {tree_s} . | zstd -3 -T{threads} -q -f -o {}",
            out.display()
        )
    };
    sh(&baseline(workers)); // warm the page cache
    let (mut snap, mut import, mut theirs, mut single) = (vec![], vec![], vec![], vec![]);
    for n in 0..3 {
        let t = Instant::now();
        sh(&baseline(workers));
        theirs.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        sh(&baseline(1));
        single.push(t.elapsed().as_secs_f64());
        let (_, summary) = kiln(&bin, &home, &["run", &copier, "--output", "json"]);
        let s: Json = serde_json::from_str(&summary).expect("summary");
        let jobs = s["imageJobs"].as_array().cloned().unwrap_or_default();
        let job = jobs
            .iter()
            .find(|j| j["kind"] == "snapshot")
            .expect("the build's snapshot job");
        assert!(
            job["bytes"].as_f64().unwrap_or(0.0) > bytes as f64 / 10.0,
            "the snapshot wrote the copied tree: {job}"
        );
        snap.push(job["seconds"].as_f64().expect("snapshot seconds"));
        // The measure before: `kiln image import` of the folder (a process and a whole tree).
        let (took, _) = kiln(
            &bin,
            &home,
            &["image", "import", &format!("bench-{n}"), &tree_s],
        );
        import.push(took.as_secs_f64());
    }
    let (o, t, i, t1) = (median(snap), median(theirs), median(import), median(single));
    let mb = bytes as f64 / 1e6;
    println!("snapshot throughput, {mb:.0} MB of files (/usr/include + /usr/lib/gcc) in an instance's upper dir, median of 3:");
    println!(
        "  kiln snapshot {o:.2} s ({:.0} MB/s) vs tar -c | zstd -3 -T{workers} {t:.2} s ({:.0} MB/s): {:.2}x the baseline's time",
        mb / o,
        mb / t,
        o / t
    );
    println!(
        "  before (kiln image import of the folder {i:.2} s against tar -c | zstd -3, one thread, {t1:.2} s): {:.2}x",
        i / t1
    );
    let _ = std::fs::remove_dir_all(&work);
}
