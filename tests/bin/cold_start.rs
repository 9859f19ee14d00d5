//! Lambda cold start of each stage function's release `bootstrap` (as `make package` builds it
//! with cargo-lambda): spawn → Runtime API /next → answer posted, against the local Runtime API
//! of `kiln_tests::runtime_api`. Baseline in the same run: spawning and reaping `/bin/true`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

const FUNCTIONS: [&str; 7] = [
    "launch-builder",
    "customize",
    "snapshot",
    "test-image",
    "distribute",
    "cleanup",
    "trigger",
];
const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn lambda_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    // `make bench` passes the lambda dir as the first argument.
    target.join("lambda")
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(lambda_dir);
    let env: Vec<(&str, String)> = vec![
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("KILN_TABLE", "kiln".into()),
        ("KILN_ARTIFACTS_BUCKET", "kiln-artifacts".into()),
        (
            "KILN_STATE_MACHINE_ARN",
            "arn:aws:states:us-east-1:123456789012:stateMachine:kiln-pipeline".into(),
        ),
    ];
    let baseline = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                let _ = std::process::Command::new("/bin/true").status();
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "baseline: spawn + reap /bin/true: {:.2} ms (median of {RUNS})",
        baseline.as_secs_f64() * 1e3
    );
    let event = serde_json::json!({"op": "benchmark-no-such-operation"});
    let mut missing = false;
    for f in FUNCTIONS {
        let bootstrap = dir.join(f).join("bootstrap");
        let Ok(meta) = std::fs::metadata(&bootstrap) else {
            println!("{f:<15} no {} (run `make package`)", bootstrap.display());
            missing = true;
            continue;
        };
        let times: Vec<Duration> = (0..RUNS)
            .map(|_| {
                kiln_tests::runtime_api::invoke_once(&bootstrap, f, &event, &env)
                    .map(|i| i.elapsed)
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
            })
            .collect();
        let m = median(times);
        println!(
            "{f:<15} bootstrap {:>10} bytes   cold start to first answer {:>7.2} ms median ({:.1}x the bare process start)",
            meta.len(),
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    if missing {
        std::process::exit(1);
    }
}
