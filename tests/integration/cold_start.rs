//! The Lambda cold-start bench (`make bench`, after `make package`): every stage function's
//! release bootstrap started cold for each invocation of real builds through the deployed stack
//! (the rehearsal's moto, every request authorized against the function's role) — and the
//! wake, cleanup and trigger functions, which a successful build run without waits does not
//! invoke, with their own events — beside two
//! baselines started the same way against the same moto with the same role:
//!
//! - `baseline-echo`: lambda_runtime answering its event (the floor of a Rust function);
//! - `baseline-dynamodb`: aws-config and the DynamoDB client, one GetItem — a Rust function as a
//!   user writes it, doing one real call.
//!
//! Each invocation is timed by the Runtime API emulator: init (spawn to the first
//! `/invocation/next`) and the invocation (that to the answer, the function's AWS calls
//! against moto). Invocations run one at a time, so that none competes with another for the
//! machine's cores. `KILN_BENCH_BUILDS` (default 2) and `KILN_BENCH_RUNS` (the baselines' and
//! the wake, cleanup and trigger invocations, default 15) raise the counts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::engine::{StateError, Status, Tasks};
use serde_json::{json, Value as Json};

use crate::rehearsal::{moto_pipeline, runtime, Bootstraps, Rehearsal, Timing};

/// The stage functions' Task deliveries, one at a time.
struct OneAtATime {
    inner: Bootstraps,
    turn: tokio::sync::Mutex<()>,
}

impl Tasks for OneAtATime {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            let _turn = self.turn.lock().await;
            self.inner.invoke(resource, state, input).await
        })
    }
}

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The release bootstraps `make package` built (`KILN_LAMBDA_DIR`, as `make bench` sets it),
/// or `None`: `make test` runs the same bench on the debug binaries, with fewer runs, so that the
/// bench itself is tested (its figures then say nothing of a release cold start).
fn lambda_dir() -> Option<PathBuf> {
    std::env::var_os("KILN_LAMBDA_DIR").map(PathBuf::from)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One row: invocations, medians of init, invocation and total, the bootstrap's size.
struct Row {
    runs: usize,
    init: Duration,
    call: Duration,
    total: Duration,
    bytes: u64,
    ops: BTreeMap<String, usize>,
}

fn row(timings: &[&Timing], bytes: u64) -> Row {
    let mut ops = BTreeMap::new();
    for t in timings {
        *ops.entry(t.op.clone()).or_insert(0) += 1;
    }
    Row {
        runs: timings.len(),
        init: median(timings.iter().map(|t| t.invocation.init).collect()),
        call: median(
            timings
                .iter()
                .map(|t| t.invocation.elapsed.saturating_sub(t.invocation.init))
                .collect(),
        ),
        total: median(timings.iter().map(|t| t.invocation.elapsed).collect()),
        bytes,
        ops,
    }
}

#[test]
fn lambda_cold_start_bench() {
    let dir = lambda_dir();
    let bootstrap = |name: &str| match &dir {
        Some(dir) => {
            let path = dir.join(name).join("bootstrap");
            assert!(
                path.is_file(),
                "{} is missing: run `make package` (the bench target builds the baselines too)",
                path.display()
            );
            path
        }
        None => crate::support::built_binary(name),
    };
    let (builds, runs) = match dir {
        Some(_) => (count("KILN_BENCH_BUILDS", 2), count("KILN_BENCH_RUNS", 15)),
        None => (1, 3),
    };
    let r = Rehearsal::deploy_running(dir.as_deref());
    // Every build builds (an unchanged pipeline would be skipped after the first).
    r.apply(&(moto_pipeline() + "schedule:\n  startCondition: always\n"));
    let rt = runtime();
    let log = Arc::new(Mutex::new(Vec::new()));
    let tasks = Arc::new(OneAtATime {
        inner: Bootstraps(r.functions.clone(), Some(log.clone())),
        turn: tokio::sync::Mutex::new(()),
    });
    let mut images = Vec::new();
    for n in 0..builds {
        let outcome = r.execute_with(&rt, tasks.clone(), "al2023-moto", &format!("bench-{n}"));
        assert_eq!(outcome.status, Status::Succeeded, "{:?}", outcome.cause);
        let output = outcome.output.unwrap_or_default();
        images.extend(
            output["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e["region"].as_str()?.to_string(),
                        e["image"].as_str()?.to_string(),
                    ))
                }),
        );
    }
    let mut timings: Vec<Timing> = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    // The two functions a build run without waits does not invoke, each with its real work:
    // the wake function given an AMI State Change of the build's image (a Query of the tokens
    // kept for it), the trigger given a parent-image event (the pipeline read, its parent
    // resolved, a StartExecution).
    let (region, image) = images.first().cloned().expect("the builds made images");
    let timed = |logical: &str, event: &Json, runs: usize| -> Vec<Timing> {
        let f = r.function(logical);
        let env: Vec<(&str, String)> = f.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        (0..runs)
            .map(|_| {
                let invocation =
                    kiln_tests::runtime_api::invoke_once(&f.path, &f.function_name, event, &env)
                        .unwrap_or_else(|e| panic!("{logical}: {e}"));
                assert!(
                    invocation.answer.0.ends_with("/response"),
                    "{logical}: {}",
                    invocation.answer.1
                );
                Timing {
                    function: f.binary.clone(),
                    op: event["op"]
                        .as_str()
                        .or(event["detail-type"].as_str())
                        .unwrap_or("event")
                        .to_string(),
                    invocation,
                }
            })
            .collect()
    };
    let ami_event = json!({
        "version": "0", "id": "bench", "detail-type": "EC2 AMI State Change", "source": "aws.ec2",
        "account": "123456789012", "time": "2026-12-02T00:00:00Z", "region": region,
        "resources": [format!("arn:aws:ec2:{region}::image/{image}")],
        "detail": {"ImageId": image, "State": "available", "ErrorMessage": ""}
    });
    timings.extend(timed("WakeFunction", &ami_event, runs));
    // The cleanup function runs in a build only when it fails; its daily lifecycle run here.
    timings.extend(timed("CleanupFunction", &json!({"op": "lifecycle"}), runs));
    let parent = json!({"pipeline": "al2023-moto", "event": {"detail": {"name": "bench"}}});
    timings.extend(timed("TriggerFunction", &parent, runs));
    // The baselines, under the cleanup function's role (it may GetItem the table).
    let cleanup = r.function("CleanupFunction");
    let env: Vec<(&str, String)> = cleanup
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let key = json!({"pk": "PIPELINE#al2023-moto", "sk": "DEF#LATEST"});
    for name in ["baseline-echo", "baseline-dynamodb"] {
        let path = bootstrap(name);
        for _ in 0..runs {
            let invocation = kiln_tests::runtime_api::invoke_once(&path, name, &key, &env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                invocation.answer.0.ends_with("/response"),
                "{name}: {}",
                invocation.answer.1
            );
            if name == "baseline-dynamodb" {
                assert_eq!(
                    invocation.answer.1,
                    json!({"found": true}),
                    "the GetItem read the pipeline"
                );
            }
            timings.push(Timing {
                function: name.into(),
                op: "-".into(),
                invocation,
            });
        }
    }
    r.assert_all_allowed();

    let mut by_function: BTreeMap<&str, Vec<&Timing>> = BTreeMap::new();
    for t in &timings {
        by_function.entry(t.function.as_str()).or_default().push(t);
    }
    let size = |name: &str| {
        std::fs::metadata(bootstrap(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let rows: BTreeMap<&str, Row> = by_function
        .iter()
        .map(|(f, ts)| (*f, row(ts, size(f))))
        .collect();
    let echo = &rows["baseline-echo"];
    let sdk = &rows["baseline-dynamodb"];
    println!(
        "Lambda cold start, {} bootstraps against the rehearsal's moto (every request authorized); {builds} builds, {runs} runs of each other; medians",
        dir.as_ref()
            .map_or("debug (make test: the bench tested, not measured)".into(), |d| format!("release from {}", d.display()))
    );
    println!(
        "{:<18} {:>5} {:>11} {:>9} {:>10} {:>10} {:>11} {:>12}  ops",
        "function", "runs", "bytes", "init ms", "call ms", "total ms", "init/echo", "total/sdk"
    );
    let order = [
        "baseline-echo",
        "baseline-dynamodb",
        "launch-builder",
        "customize",
        "snapshot",
        "test-image",
        "distribute",
        "cleanup",
        "wake",
        "trigger",
    ];
    let mut report = Vec::new();
    for name in order {
        let Some(row) = rows.get(name) else {
            panic!(
                "no invocation of {name}: {:?}",
                rows.keys().collect::<Vec<_>>()
            );
        };
        let ops: Vec<String> = row.ops.iter().map(|(op, n)| format!("{op}×{n}")).collect();
        println!(
            "{name:<18} {:>5} {:>11} {:>9.1} {:>10.1} {:>10.1} {:>10.2}x {:>11.2}x  {}",
            row.runs,
            row.bytes,
            ms(row.init),
            ms(row.call),
            ms(row.total),
            row.init.as_secs_f64() / echo.init.as_secs_f64(),
            row.total.as_secs_f64() / sdk.total.as_secs_f64(),
            ops.join(" ")
        );
        report.push(json!({
            "function": name, "runs": row.runs, "bytes": row.bytes, "initMs": ms(row.init),
            "callMs": ms(row.call), "totalMs": ms(row.total),
            "initOverEcho": row.init.as_secs_f64() / echo.init.as_secs_f64(),
            "totalOverSdk": row.total.as_secs_f64() / sdk.total.as_secs_f64(),
        }));
    }
    if let Some(out) = std::env::var_os("KILN_BENCH_JSON") {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
        .expect("write the bench's JSON");
    }
}
