//! infra/statemachine/pipeline.asl.json, the one definition: consistent with the error contract
//! and the stage functions, and run end to end by kiln's engine with the real stage code over
//! the in-memory cloud — success in two regions, a skip, a lock, and a failure at every stage.

use std::collections::BTreeSet;
use std::sync::Arc;

use kiln::engine::{clock::VirtualClock, definition, substitute, Engine, Status};
use kiln::errors::ErrorKind;
use kiln::model::build::BuildStatus;
use kiln::ports::{CommandStatus, PipelineRecord};
use kiln::stages::handler::{local_substitutions, Function, StageTasks};
use kiln_testkit::MemoryCloud;
use serde_json::{json, Value as Json};

use crate::support::repo;

fn definition_json() -> Json {
    serde_json::from_str(
        &std::fs::read_to_string(repo().join("infra/statemachine/pipeline.asl.json"))
            .expect("the definition"),
    )
    .expect("JSON")
}

fn collect(v: &Json, key: &str, out: &mut Vec<Json>) {
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                if k == key {
                    out.push(x.clone());
                }
                collect(x, key, out);
            }
        }
        Json::Array(a) => a.iter().for_each(|x| collect(x, key, out)),
        _ => {}
    }
}

#[test]
fn every_error_name_is_in_the_contract_and_every_contract_name_is_handled() {
    let mut lists = Vec::new();
    collect(&definition_json(), "ErrorEquals", &mut lists);
    let named: BTreeSet<String> = lists
        .iter()
        .flat_map(|l| l.as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let kiln_names: BTreeSet<String> = named
        .iter()
        .filter(|n| n.starts_with("Kiln."))
        .cloned()
        .collect();
    let contract: BTreeSet<String> = ErrorKind::ALL
        .iter()
        .map(|k| k.error_type().to_string())
        .collect();
    assert_eq!(kiln_names, contract, "ASL names vs the ErrorKind enum");
    for other in named.iter().filter(|n| !n.starts_with("Kiln.")) {
        assert!(
            other.starts_with("States.") || other.starts_with("Lambda."),
            "unexpected error name {other}"
        );
    }
}

#[test]
fn every_task_names_a_stage_function_and_every_function_is_used() {
    let mut resources = Vec::new();
    collect(&definition_json(), "Resource", &mut resources);
    // The Lambda integration (`.waitForTaskToken`) names its function in its parameters.
    let mut named = Vec::new();
    collect(&definition_json(), "FunctionName", &mut named);
    let integrations: BTreeSet<&str> = resources
        .iter()
        .filter_map(|r| r.as_str())
        .filter(|r| r.starts_with("arn:aws:states:::"))
        .collect();
    assert_eq!(
        integrations,
        BTreeSet::from(["arn:aws:states:::lambda:invoke.waitForTaskToken"])
    );
    let used: BTreeSet<String> = resources
        .iter()
        .chain(&named)
        .filter_map(|r| r.as_str())
        .filter(|r| !r.starts_with("arn:aws:states:::"))
        .map(|r| r.trim_start_matches("${").trim_end_matches('}').to_string())
        .collect();
    let functions: BTreeSet<String> = Function::ALL
        .iter()
        .map(|f| f.substitution().to_string())
        .collect();
    assert_eq!(used, functions);
    let (code, stdout, stderr) = crate::support::kiln(&[
        "sfn",
        "validate",
        &repo()
            .join("infra/statemachine/pipeline.asl.json")
            .display()
            .to_string(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// A cloud with the AWS example applied and its parent image published.
fn cloud() -> Arc<MemoryCloud> {
    // The store is SQLite; compute, commands and their faults are the in-memory cloud's.
    let cloud = Arc::new(MemoryCloud::on_sqlite());
    let loaded =
        kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml")).expect("valid");
    futures::executor::block_on(
        cloud
            .ports()
            .store
            .put_pipeline(&PipelineRecord::from(&loaded)),
    )
    .expect("applied");
    let parent = cloud.add_image("us-east-1", "al2023-ami-2023.6");
    futures::executor::block_on(cloud.ports().parameters.put(
        "us-east-1",
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        parent.as_str(),
    ))
    .expect("param");
    cloud
}

fn execute(cloud: &Arc<MemoryCloud>, name: &str, input: Json) -> kiln::engine::Outcome {
    let machine = definition::parse(&substitute(&definition_json(), &local_substitutions()))
        .expect("valid definition");
    let engine = Engine::new(
        Arc::new(StageTasks(cloud.clone())),
        Arc::new(VirtualClock::default()),
        true,
    )
    .with_tokens(cloud.wakeups.tokens());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(with_events(cloud, engine.run(&machine, input, name)))
}

/// `run` with the in-memory cloud's event source beside it: each awaited resource's state read
/// every 10 ms and announced, as the embedded mode does.
async fn with_events<T>(cloud: &Arc<MemoryCloud>, run: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        out = run => out,
        () = cloud.wakeups.serve(cloud.as_ref(), std::time::Duration::from_millis(10)) => {
            unreachable!("the event source never ends")
        }
    }
}

/// One `…Await` state as the definition writes it, over the in-memory cloud: the wake
/// function's `watch` keeps the token and, when what it awaits has already reached its state
/// (the event came before the token), answers it at once; otherwise only an event answers it
/// (`stages::wake::announce`, as the stack's rules deliver it) — or its timeout.
fn await_state(
    cloud: &Arc<MemoryCloud>,
    awaiting: Json,
    announce: Option<(&str, &str)>,
) -> kiln::engine::Outcome {
    let d = definition_json();
    let mut state = d["States"]["SnapshotAwait"].clone();
    state["TimeoutSecondsPath"] = json!("$.waitSeconds");
    state["Catch"] = json!([]);
    state.as_object_mut().expect("a state").remove("Next");
    state["End"] = json!(true);
    state["ResultPath"] = json!("$.woken");
    let machine = json!({"StartAt": "SnapshotAwait", "States": {"SnapshotAwait": state}});
    let machine = definition::parse(&substitute(&machine, &local_substitutions())).expect("valid");
    let engine = Engine::new(
        Arc::new(StageTasks(cloud.clone())),
        Arc::new(VirtualClock::default()),
        true,
    )
    .with_tokens(cloud.wakeups.tokens());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let run = engine.run(
            &machine,
            json!({"build": {"awaiting": awaiting}, "waitSeconds": 3}),
            "await-1",
        );
        let event = async {
            if let Some((id, state)) = announce {
                while cloud.wakeups.awaited().is_empty() {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                let a = kiln::stages::wake::Announced {
                    region: "us-east-1".into(),
                    id: id.into(),
                    state: state.into(),
                };
                kiln::stages::wake::announce(&cloud.ports(), &a)
                    .await
                    .expect("announce");
            }
        };
        let (out, ()) = futures::join!(run, event);
        out
    })
}

#[test]
fn a_wait_ends_by_its_event_or_at_once_when_the_state_came_first_and_else_by_its_timeout() {
    let cloud = cloud();
    let image = cloud.add_image("us-east-1", "kiln-made");
    let awaiting = |id: &str| json!({"kind": "image", "region": "us-east-1", "id": id, "until": ["available", "failed"]});
    // The image is available already: watch answers its own token.
    let out = await_state(&cloud, awaiting(image.as_str()), None);
    assert_eq!(out.status, Status::Succeeded, "{:?}", out.cause);
    assert_eq!(
        out.output.as_ref().map(|o| o["woken"].clone()),
        Some(json!({"state": "available", "by": "watch"}))
    );
    let kinds: Vec<&str> = out.history.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"TaskSubmitted") && kinds.contains(&"TaskSucceeded"),
        "{kinds:?}"
    );
    let answer = |out: &kiln::engine::Outcome| {
        out.history
            .iter()
            .find(|e| e.kind == "TaskSucceeded")
            .map(|e| e.details["output"].clone())
    };
    assert_eq!(
        answer(&out),
        Some(json!({"state": "available", "by": "watch"}))
    );
    // An image the cloud does not know yet (pending, say): the event answers the token …
    let out = await_state(
        &cloud,
        awaiting("ami-0notyet0000000000"),
        Some(("ami-0notyet0000000000", "available")),
    );
    assert_eq!(
        answer(&out),
        Some(json!({"state": "available", "by": "event"}))
    );
    // … an event of a state the wait does not end in does not (nor one for another image) …
    let started = std::time::Instant::now();
    let out = await_state(
        &cloud,
        awaiting("ami-0notyet0000000000"),
        Some(("ami-0notyet0000000000", "pending")),
    );
    assert_eq!(out.status, Status::Failed);
    assert_eq!(
        out.error.as_deref(),
        Some("States.Timeout"),
        "{:?}",
        out.cause
    );
    assert!(out.history.iter().any(|e| e.kind == "TaskTimedOut"));
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    // … and no token outlives its task.
    assert_eq!(cloud.wakeups.tokens().waiting(), 0);
}

fn input() -> Json {
    json!({"pipeline": "al2023-base", "trigger": {"kind": "manual"}})
}

#[test]
fn the_state_machine_builds_and_distributes_an_image() {
    // GIVEN images that stay pending and commands that take a while, and no waitSeconds (30 s
    // by default, in virtual time)
    let cloud = cloud();
    cloud.with(|c| {
        c.faults.image_pending_checks = 3;
        c.faults.command_in_progress_checks = 2;
    });
    // WHEN the execution runs
    let out = execute(&cloud, "exec-1", input());
    // THEN it succeeds with the AVAILABLE build, in both regions, and nothing runs
    assert_eq!(
        out.status,
        Status::Succeeded,
        "{:?} {:?}",
        out.error,
        out.cause
    );
    let build = out.output.clone().expect("output");
    assert_eq!(build["status"], "AVAILABLE");
    assert_eq!(build["regions"].as_array().map(Vec::len), Some(2));
    assert!(cloud.live_instances().is_empty());
    // AND the history reads like AWS's, with the counts that make the bill
    assert!(out
        .history
        .iter()
        .any(|e| e.kind == "LambdaFunctionScheduled"));
    // (the image's wait ends by its event: the token of SnapshotAwait)
    assert!(
        out.history
            .iter()
            .any(|e| e.kind == "TaskSubmitted" && e.state.as_deref() == Some("SnapshotAwait")),
        "pending images made it wait"
    );
    assert!(
        out.state_transitions() > 20 && out.task_invocations() > 10,
        "{} transitions, {} invocations",
        out.state_transitions(),
        out.task_invocations()
    );
}

/// The poll interval comes from the execution's input, which anyone allowed StartExecution (or a
/// forged schedule, or a redriven execution) writes. 0 or less made every Wait a busy loop in AWS
/// (a Lambda invocation and three billed transitions per turn, for as long as the stage's
/// timeout), and a huge one let a stage overrun its timeout by that much: the definition refuses
/// both before anything starts. The rehearsal and these tests poll every second, in virtual time.
#[test]
fn a_wait_of_zero_negative_huge_or_not_a_number_is_refused_before_the_build_starts() {
    for hostile in [
        json!(0),
        json!(-5),
        json!(0.5),
        json!(301),
        json!(1e9),
        json!("30"),
        json!(null),
    ] {
        // GIVEN a forged input with that poll interval
        let cloud = cloud();
        let mut input = input();
        input["waitSeconds"] = hostile.clone();
        // WHEN it is executed
        let out = execute(&cloud, "exec-hostile", input);
        // THEN it fails at once with the refusal, nothing invoked, no build recorded, no lock
        assert_eq!(out.status, Status::Failed, "{hostile}");
        assert_eq!(out.error.as_deref(), Some("Kiln.InvalidInput"), "{hostile}");
        assert!(
            out.cause
                .as_deref()
                .unwrap_or_default()
                .contains("waitSeconds must be a number of seconds from 1 to 300"),
            "{hostile}: {:?}",
            out.cause
        );
        assert_eq!(out.task_invocations(), 0, "{hostile}");
        let builds =
            futures::executor::block_on(cloud.ports().store.builds("al2023-base")).expect("builds");
        assert!(builds.is_empty(), "{hostile}: {builds:?}");
    }
    // AND the positive control: the same input polling every second (the shortest allowed)
    // builds, its checks polling while the images are pending
    let cloud = cloud();
    cloud.with(|c| {
        c.faults.image_pending_checks = 2;
        c.faults.command_in_progress_checks = 2;
    });
    let mut input = input();
    input["waitSeconds"] = json!(1);
    let out = execute(&cloud, "exec-1s", input);
    assert_eq!(out.status, Status::Succeeded, "{:?}", out.cause);
}

/// The execution's own TimeoutSeconds is what ends an execution nothing else ends (a stage check
/// that keeps answering "not yet" past its stage's deadline, a wait that is never answered):
/// at least every stage at its longest allowed timeout (the pipeline schema's maximum) plus one
/// more poll of every polling Wait at the longest allowed interval (CheckInput's bound).
#[test]
fn the_definition_times_out_no_sooner_than_its_longest_allowed_build() {
    let definition = definition_json();
    let timeout = definition["TimeoutSeconds"]
        .as_u64()
        .expect("the definition has its own TimeoutSeconds");
    // The longest poll interval CheckInput lets through.
    let mut bounds = Vec::new();
    collect(
        &definition["States"]["CheckInput"],
        "NumericLessThanEquals",
        &mut bounds,
    );
    assert_eq!(
        bounds.len(),
        1,
        "CheckInput bounds waitSeconds once: {bounds:?}"
    );
    let longest_wait = bounds[0].as_u64().expect("a whole number of seconds");
    // The Wait states that wait waitSeconds, in every branch and iterator.
    let mut paths = Vec::new();
    collect(&definition, "SecondsPath", &mut paths);
    let waits = paths.iter().filter(|p| *p == "$.waitSeconds").count() as u64;
    assert!(waits >= 5, "{paths:?}");
    // Every stage's longest timeout, from the schema `kiln schema pipeline` prints.
    let (code, schema, stderr) = crate::support::kiln(&["schema", "pipeline"]);
    assert_eq!(code, 0, "{stderr}");
    let schema: Json = serde_json::from_str(&schema).expect("JSON");
    let stages = schema["$defs"]["Timeouts"]["properties"]
        .as_object()
        .expect("the Timeouts of the schema");
    assert_eq!(stages.len(), 5, "{stages:?}");
    let minutes: u64 = stages
        .iter()
        .map(|(k, v)| {
            v["maximum"]
                .as_u64()
                .unwrap_or_else(|| panic!("{k} has no maximum: {v}"))
        })
        .sum();
    let needed = minutes * 60 + waits * longest_wait;
    assert!(
        timeout >= needed,
        "TimeoutSeconds {timeout} < {minutes} stage minutes + {waits} waits of {longest_wait} s = {needed}"
    );
    // Step Functions' own ceiling for a Standard execution: one year.
    assert!(timeout <= 365 * 24 * 3600, "{timeout}");
}

#[test]
fn an_unchanged_pipeline_is_skipped_and_the_execution_succeeds() {
    let cloud = cloud();
    assert_eq!(execute(&cloud, "exec-1", input()).status, Status::Succeeded);
    let launches = cloud.with(|c| c.launches);
    let out = execute(&cloud, "exec-2", input());
    assert_eq!(out.status, Status::Succeeded);
    assert_eq!(out.output.expect("output")["status"], "SKIPPED");
    assert_eq!(cloud.with(|c| c.launches), launches);
}

/// Takes the pipeline's lock for `holder`, as a build that runs holds it.
fn hold(
    cloud: &MemoryCloud,
    holder: &kiln::model::build::BuildId,
) -> Result<(), kiln::errors::StageError> {
    futures::executor::block_on(
        cloud
            .store()
            .lock("al2023-base", holder, chrono::Utc::now(), 3600),
    )
}

#[test]
fn a_second_execution_while_one_runs_fails_locked_and_names_the_holder() {
    let cloud = cloud();
    let holder = kiln::model::build::BuildId::new_at(1);
    hold(&cloud, &holder).expect("lock");
    let out = execute(&cloud, "exec-1", input());
    assert_eq!(out.status, Status::Failed);
    assert_eq!(out.error.as_deref(), Some("Kiln.Locked"));
    assert!(out.cause.unwrap_or_default().contains(holder.as_str()));
    let builds = futures::executor::block_on(cloud.store().builds("al2023-base")).expect("builds");
    assert!(builds.is_empty(), "no build was recorded");
    assert!(!cloud.lock_free("al2023-base"), "the holder keeps its lock");
    hold(&cloud, &holder).expect("still the holder's");
}

#[test]
fn a_failure_at_every_stage_ends_the_execution_with_its_error_after_cleanup() {
    for (stage, want) in [
        ("launch", "Kiln.Capacity"),
        ("customize", "Kiln.ComponentFailed"),
        ("snapshot", "Kiln.Internal"),
        ("test", "Kiln.TestFailed"),
        ("distribute", "Kiln.Internal"),
    ] {
        let cloud = cloud();
        cloud.with(|c| match stage {
            "launch" => c
                .faults
                .no_capacity
                .extend(["t3.small", "t3a.small", "m5.large"].map(String::from)),
            "customize" => {
                c.faults.command_fails.insert(
                    "build".into(),
                    CommandStatus::Failed {
                        message: "component harden, build/DisableRootLogin: exit code 2".into(),
                        output_tail: "sed: can't read".into(),
                    },
                );
            }
            "snapshot" => c.faults.image_fails = true,
            "test" => {
                c.faults.command_fails.insert(
                    "test".into(),
                    CommandStatus::Failed {
                        message: "component smoke, test/SshdConfigValid: exit code 255".into(),
                        output_tail: String::new(),
                    },
                );
            }
            _ => {
                c.faults.copy_fails.insert("eu-central-1".into());
            }
        });
        let out = execute(&cloud, "exec-1", input());
        // THEN the execution fails with the stage's error name and a cause that says what failed
        assert_eq!(out.status, Status::Failed, "{stage}");
        assert_eq!(out.error.as_deref(), Some(want), "{stage}: {:?}", out.cause);
        // AND cleanup ran: FAILED with the reason, nothing running or left, the lock free
        let builds =
            futures::executor::block_on(cloud.store().builds("al2023-base")).expect("builds");
        assert_eq!(builds.len(), 1, "{stage}");
        assert_eq!(builds[0].status, BuildStatus::Failed, "{stage}");
        assert_eq!(
            builds[0].failure.as_ref().map(|f| f.error.as_str()),
            Some(want),
            "{stage}"
        );
        assert!(cloud.live_instances().is_empty(), "{stage}");
        assert!(
            cloud.build_images().is_empty(),
            "{stage}: {:?}",
            cloud.build_images()
        );
        assert!(cloud.lock_free("al2023-base"), "{stage}");
    }
}

/// The cleanup's own Catch: when the cleanup still fails after its retries, RecordFailure
/// (the store only) ends the build FAILED with both errors and frees the lock; the execution
/// still fails with the first error. Without the Catch the execution fails with the cleanup's
/// error and leaves the build BUILDING, its pipeline locked.
#[test]
fn a_cleanup_that_fails_even_after_its_retries_records_the_build_failed_and_frees_the_lock() {
    // GIVEN a component that fails, and EC2 refusing every TerminateInstances
    let cloud = cloud();
    cloud.with(|c| {
        c.faults.command_fails.insert(
            "build".into(),
            CommandStatus::Failed {
                message: "component harden, build/DisableRootLogin: exit code 2".into(),
                output_tail: String::new(),
            },
        );
        c.faults.terminate_fails = true;
    });
    // WHEN the execution runs
    let out = execute(&cloud, "exec-cleanup-fails", input());
    // THEN it fails with the component's error, after the cleanup's attempts and RecordFailure
    assert_eq!(out.status, Status::Failed);
    assert_eq!(
        out.error.as_deref(),
        Some("Kiln.ComponentFailed"),
        "{:?}",
        out.cause
    );
    let failed_attempts = out
        .history
        .iter()
        .filter(|e| e.kind == "LambdaFunctionFailed" && e.state.as_deref() == Some("Cleanup"))
        .count();
    assert_eq!(failed_attempts, 7, "the cleanup and its six retries");
    assert!(out
        .history
        .iter()
        .any(|e| e.kind == "TaskStateEntered" && e.state.as_deref() == Some("RecordFailure")));
    // AND the build is FAILED at customize, the reason naming both failures and the builder
    let builds = futures::executor::block_on(cloud.store().builds("al2023-base")).expect("builds");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].status, BuildStatus::Failed);
    let failure = builds[0].failure.clone().expect("a failure");
    assert_eq!(
        (failure.stage.as_str(), failure.error.as_str()),
        ("customize", "Kiln.ComponentFailed")
    );
    let live = cloud.live_instances();
    assert_eq!(live.len(), 1, "the builder the cleanup could not terminate");
    assert!(
        failure.message.contains("exit code 2")
            && failure
                .message
                .contains("then the cleanup failed (Kiln.Retryable: TerminateInstances")
            && failure.message.contains(live[0].as_str()),
        "{}",
        failure.message
    );
    // AND the lock is free
    assert!(cloud.lock_free("al2023-base"));
}

#[test]
fn a_failed_test_shares_and_publishes_nothing_and_its_copies_are_removed() {
    // GIVEN the two-region example (shares with accounts and an organization, publishes to SSM
    // and a launch template) and a test that fails
    let cloud = cloud();
    cloud.with(|c| {
        c.faults.command_fails.insert(
            "test".into(),
            CommandStatus::Failed {
                message: "component smoke, test/SshdConfigValid: exit code 255".into(),
                output_tail: String::new(),
            },
        );
    });
    // WHEN it runs
    let out = execute(&cloud, "exec-1", input());
    // THEN it fails the test
    assert_eq!(
        out.error.as_deref(),
        Some("Kiln.TestFailed"),
        "{:?}",
        out.cause
    );
    // AND the copy to eu-central-1 was made beside the test, then removed with its snapshot
    assert_eq!(cloud.with(|c| c.copies), 1);
    assert!(
        cloud.build_images().is_empty(),
        "{:?}",
        cloud.build_images()
    );
    let orphans = cloud.with(|c| {
        c.snapshots
            .iter()
            .filter(|(_, s)| !c.images.contains_key(&s.image))
            .count()
    });
    assert_eq!(orphans, 0, "snapshots of deleted images left");
    // AND nothing was shared, published to SSM or written to a launch template
    assert_eq!(cloud.with(|c| c.shares.clone()), vec![]);
    let published: Vec<_> = cloud.with(|c| {
        c.parameters
            .keys()
            .filter(|(_, name)| name.starts_with("/images/"))
            .cloned()
            .collect()
    });
    assert!(published.is_empty(), "{published:?}");
    assert!(cloud.with(|c| c.launch_templates.is_empty()));
    // AND the failure names the test stage
    let builds = futures::executor::block_on(cloud.store().builds("al2023-base")).expect("builds");
    assert_eq!(
        builds[0].failure.as_ref().map(|f| f.stage.as_str()),
        Some("test")
    );
}

#[test]
fn two_starts_at_once_make_one_build_and_the_second_names_the_holder() {
    // GIVEN two executions started together, commands that take a while, real 1 s waits (so
    // that the executions interleave)
    let cloud = cloud();
    cloud.with(|c| c.faults.command_in_progress_checks = 1);
    let machine = definition::parse(&substitute(&definition_json(), &local_substitutions()))
        .expect("valid definition");
    let engine = Engine::new(
        Arc::new(StageTasks(cloud.clone())),
        Arc::new(kiln::engine::clock::RealClock),
        false,
    )
    .with_tokens(cloud.wakeups.tokens());
    let mut input = input();
    input["waitSeconds"] = json!(1);
    let (a, b) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            with_events(
                &cloud,
                futures::future::join(
                    engine.run(&machine, input.clone(), "exec-a"),
                    engine.run(&machine, input.clone(), "exec-b"),
                ),
            )
            .await
        });
    // THEN one succeeds, the other fails Kiln.Locked naming the first's build, and one build exists
    let (won, lost) = if a.status == Status::Succeeded {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(won.status, Status::Succeeded, "{:?}", won.cause);
    assert_eq!(
        lost.error.as_deref(),
        Some("Kiln.Locked"),
        "{:?}",
        lost.cause
    );
    let builds = futures::executor::block_on(cloud.store().builds("al2023-base")).expect("builds");
    assert_eq!(builds.len(), 1);
    assert!(lost
        .cause
        .unwrap_or_default()
        .contains(builds[0].id.as_str()));
}

#[test]
fn the_schedule_is_disabled_after_the_configured_number_of_failed_scheduled_builds() {
    // GIVEN the example (disableAfterFailures: 3) building on every scheduled start, its
    // schedule enabled, and a failing component
    let cloud = cloud();
    let apply = |version: &str| {
        let mut loaded =
            kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml")).expect("valid");
        loaded.pipeline.version = version.into();
        let schedule = loaded.pipeline.schedule.as_mut().expect("a schedule");
        schedule.start_condition = kiln::model::pipeline::StartCondition::Always;
        futures::executor::block_on(
            cloud
                .ports()
                .store
                .put_pipeline(&PipelineRecord::from(&loaded)),
        )
        .expect("applied");
    };
    apply("1.0.0");
    let fail = |cloud: &Arc<MemoryCloud>, message: &str| {
        cloud.with(|c| {
            c.faults.command_fails.insert(
                "build".into(),
                CommandStatus::Failed {
                    message: message.into(),
                    output_tail: String::new(),
                },
            )
        });
    };
    // The schedule is SQLite's, as the embedded mode keeps it.
    cloud.add_schedule("al2023-base");
    fail(
        &cloud,
        "component harden, build/DisableRootLogin: exit code 2",
    );
    let disabled = |cloud: &Arc<MemoryCloud>| cloud.schedule_disabled("al2023-base").is_some();
    let scheduled = json!({"pipeline": "al2023-base", "trigger": {"kind": "schedule"}});
    // WHEN two scheduled builds fail, the schedule stays
    for n in 1..=2 {
        let out = execute(&cloud, &format!("exec-{n}"), scheduled.clone());
        assert_eq!(out.error.as_deref(), Some("Kiln.ComponentFailed"));
        assert!(!disabled(&cloud), "after {n} failures");
    }
    // AND manual starts neither count (a failure) nor reset (a success), as Image Builder counts
    // only scheduled executions
    let out = execute(&cloud, "manual-fails", input());
    assert_eq!(out.error.as_deref(), Some("Kiln.ComponentFailed"));
    assert!(!disabled(&cloud), "a manual failure counted");
    cloud.with(|c| c.faults.command_fails.clear());
    assert_eq!(
        execute(&cloud, "manual-ok", input()).status,
        Status::Succeeded
    );
    fail(&cloud, "again");
    // AND a scheduled start that finds the pipeline locked made no build and is not counted
    let holder = kiln::model::build::BuildId("01HOLDER".into());
    hold(&cloud, &holder).expect("held");
    let out = execute(&cloud, "locked", scheduled.clone());
    assert_eq!(out.error.as_deref(), Some("Kiln.Locked"), "{:?}", out.cause);
    assert!(!disabled(&cloud), "a locked start counted");
    futures::executor::block_on(cloud.store().unlock("al2023-base", &holder)).expect("unlock");
    // THEN the third scheduled failure disables it and says so
    let out = execute(&cloud, "exec-3", scheduled.clone());
    assert_eq!(out.error.as_deref(), Some("Kiln.ComponentFailed"));
    assert!(disabled(&cloud), "after the third scheduled failure");
    let note = cloud.with(|c| c.events.iter().rev().find_map(|e| e.note.clone()));
    assert_eq!(
        note.as_deref(),
        Some("schedule disabled after 3 consecutive failed builds (disableAfterFailures: 3)")
    );
    // AND a scheduled success resets the count: one failure after it leaves the schedule on
    cloud.add_schedule("al2023-base");
    cloud.with(|c| c.faults.command_fails.clear());
    // (image names carry the build's second: not the same as manual-ok's image)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        execute(&cloud, "exec-ok", scheduled.clone()).status,
        Status::Succeeded
    );
    fail(&cloud, "again");
    execute(&cloud, "exec-4", scheduled.clone());
    execute(&cloud, "exec-5", scheduled.clone());
    assert!(!disabled(&cloud), "two failures after a success");
    // AND so does a new definition version: two more failures of 1.0.1 leave the schedule on,
    // though four builds in a row have failed
    apply("1.0.1");
    execute(&cloud, "exec-6", scheduled.clone());
    execute(&cloud, "exec-7", scheduled.clone());
    assert!(!disabled(&cloud), "failures of the old version counted");
    execute(&cloud, "exec-8", scheduled);
    assert!(disabled(&cloud), "the third failure of 1.0.1");
}
