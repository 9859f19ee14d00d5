//! The stages over their ports, driven as the state machine drives them (start → check until
//! ready → next stage; any error → cleanup), on the in-memory cloud: it honours ClientToken,
//! keeps images pending, and fails or stalls commands on request — what moto cannot show.

use futures::executor::block_on;
use kiln::errors::{ErrorKind, StageError};
use kiln::model::build::{Build, BuildStatus, Trigger, TriggerKind};
use kiln::model::pipeline::ParentFilter;
use kiln::ports::{CommandStatus, PipelineRecord, Ports};
use kiln::stages::{
    cleanup, customize, distribute, launch_builder, snapshot, test_image, StartRequest,
};
use kiln_testkit::MemoryCloud;

use crate::support::repo;

const PARENT_PARAM: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// A cloud with the AWS example pipeline applied and its parent image published. The store is
/// SQLite (a real store, with its transactions and constraints); compute, commands and their
/// faults are the in-memory cloud's, for what no real part shows.
fn cloud() -> MemoryCloud {
    let cloud = MemoryCloud::on_sqlite();
    let loaded = kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml"))
        .expect("example is valid");
    block_on(
        cloud
            .ports()
            .store
            .put_pipeline(&PipelineRecord::from(&loaded)),
    )
    .expect("stored");
    let parent = cloud.add_image("us-east-1", "al2023-ami-2023.6");
    block_on(
        cloud
            .ports()
            .parameters
            .put("us-east-1", PARENT_PARAM, parent.as_str()),
    )
    .expect("param");
    cloud
}

fn request(id: &str) -> StartRequest {
    StartRequest {
        pipeline: "al2023-base".into(),
        trigger: Trigger {
            kind: TriggerKind::Manual,
            detail: None,
        },
        request_id: Some(id.into()),
    }
}

/// Calls `check` until ready, at most 20 times (the state machine's bounded poll loop).
fn until_ready(
    mut build: Build,
    check: impl Fn(Build) -> Result<Build, StageError>,
) -> Result<Build, StageError> {
    for _ in 0..20 {
        build = check(build)?;
        if build.ready {
            return Ok(build);
        }
    }
    Err(StageError::new(
        ErrorKind::Timeout,
        "not ready after 20 checks",
    ))
}

/// Runs a whole build; on failure runs cleanup with the error, as the state machine's Catch does.
#[allow(clippy::result_large_err)] // a test helper: the failed build is what the tests inspect
fn run(ports: &Ports<'_>, req: &StartRequest) -> Result<Build, (Build, StageError)> {
    let mut last: Option<Build> = None;
    let result = (|| -> Result<Build, StageError> {
        let b = block_on(launch_builder::start(ports, req))?;
        last = Some(b.clone());
        let b = until_ready(b, |b| block_on(launch_builder::check(ports, b)))?;
        if b.status == BuildStatus::Skipped {
            return Ok(b);
        }
        let b = block_on(customize::start(ports, b))?;
        last = Some(b.clone());
        let b = until_ready(b, |b| block_on(customize::check(ports, b)))?;
        let b = block_on(snapshot::start(ports, b))?;
        last = Some(b.clone());
        let b = until_ready(b, |b| block_on(snapshot::check(ports, b)))?;
        let b = block_on(test_image::start(ports, b))?;
        last = Some(b.clone());
        let b = until_ready(b, |b| block_on(test_image::check(ports, b)))?;
        let b = block_on(distribute::begin(ports, b))?;
        last = Some(b.clone());
        let record = block_on(ports.store.pipeline(&b.pipeline))?.expect("record");
        let mut regions = Vec::new();
        for d in &record.pipeline.distribution {
            let mut entry = block_on(distribute::start(ports, &b, &d.region))?;
            for _ in 0..20 {
                entry = block_on(distribute::check(ports, &b, entry))?;
                if entry.state == kiln::model::build::RegionState::Shared {
                    break;
                }
            }
            regions.push(entry);
        }
        block_on(distribute::finish(ports, b, regions))
    })();
    result.map_err(|e| {
        let cleaned = match last {
            Some(b) => block_on(cleanup::run(ports, b, e.error_type(), &e.message))
                .expect("cleanup succeeds"),
            // The first operation failed: its Catch has only the execution input.
            None => block_on(cleanup::run_for_request(
                ports,
                req,
                e.error_type(),
                &e.message,
            ))
            .expect("cleanup succeeds")
            .expect("the failed start had recorded its build"),
        };
        (cleaned, e)
    })
}

#[test]
fn a_build_ends_available_in_every_region_with_nothing_left_running() {
    // GIVEN the example pipeline, with images that stay pending and commands that take a while
    let cloud = cloud();
    cloud.with(|c| {
        c.faults.image_pending_checks = 2;
        c.faults.command_in_progress_checks = 2;
    });
    // WHEN a build runs
    let build = run(&cloud.ports(), &request("exec-1")).expect("the build succeeds");
    // THEN it is AVAILABLE with an image per region, shared and published, and nothing runs
    assert_eq!(build.status, BuildStatus::Available);
    assert_eq!(build.version(), "2.1.0/1");
    let stored = block_on(cloud.ports().store.build(&build.pipeline, &build.id))
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status, BuildStatus::Available);
    assert_eq!(build.regions.len(), 2);
    cloud.with(|c| {
        for r in &build.regions {
            let image = r.image.as_ref().expect("image");
            let img = &c.images[image];
            assert_eq!(img.region, r.region);
            assert_eq!(
                img.tags.get("kiln:build-id"),
                Some(&build.id.0),
                "images carry the build id"
            );
            // The region's distribution tags, the build region's image included.
            let want = if r.region == "us-east-1" {
                Some("al2023")
            } else {
                None
            };
            assert_eq!(
                img.tags.get("os").map(String::as_str),
                want,
                "distribution tags in {}",
                r.region
            );
            assert!(
                !img.shared_with.is_empty(),
                "launch permissions applied in {}",
                r.region
            );
            assert_eq!(
                c.parameters
                    .get(&(r.region.clone(), "/images/al2023-base/latest".into())),
                Some(&image.0)
            );
        }
        assert_eq!(
            c.launch_templates.len(),
            1,
            "the us-east-1 launch template got a version"
        );
        let states: Vec<BuildStatus> = c.events.iter().map(|e| e.state).collect();
        assert_eq!(
            states,
            [
                BuildStatus::Building,
                BuildStatus::Snapshotting,
                BuildStatus::Testing,
                BuildStatus::Distributing,
                BuildStatus::Available
            ],
            "an event for every status change"
        );
        let sent: Vec<Vec<&str>> = c
            .commands
            .values()
            .map(|cmd| cmd.plan.phases.iter().map(|p| p.as_str()).collect())
            .collect();
        assert_eq!(sent, [vec!["build", "validate"], vec!["test"]]);
        let builder_tags = &c.instances[&build.builder.as_ref().expect("builder").id].tags;
        assert_eq!(
            builder_tags.get("kiln:pipeline").map(String::as_str),
            Some("al2023-base")
        );
        assert_eq!(
            builder_tags.get("cost-center").map(String::as_str),
            Some("platform")
        );
    });
    assert!(cloud.lock_free("al2023-base"), "lock released");
    assert!(
        cloud.live_instances().is_empty(),
        "builder and test instance terminated"
    );
}

#[test]
fn on_change_skips_a_build_whose_inputs_did_not_change() {
    let cloud = cloud();
    run(&cloud.ports(), &request("exec-1")).expect("first build");
    let launches = cloud.with(|c| c.launches);
    // WHEN the same pipeline runs again on the same parent
    let second = run(&cloud.ports(), &request("exec-2")).expect("second run");
    // THEN it is SKIPPED, recorded, and launched nothing
    assert_eq!(second.status, BuildStatus::Skipped);
    assert_eq!(cloud.with(|c| c.launches), launches);
    // AND a new parent image makes the next run build again (an hour later: the example's image
    // names carry the build date to the second)
    *cloud.now.lock().expect("clock") = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let newer = cloud.add_image("us-east-1", "al2023-ami-2023.7");
    block_on(
        cloud
            .ports()
            .parameters
            .put("us-east-1", PARENT_PARAM, newer.as_str()),
    )
    .expect("param");
    let third = run(&cloud.ports(), &request("exec-3")).expect("third run");
    assert_eq!(third.status, BuildStatus::Available);
    assert_eq!(
        third.version(),
        "2.1.0/2",
        "build numbers count per definition version"
    );
}

#[test]
fn capacity_errors_move_to_the_next_instance_type() {
    let cloud = cloud();
    cloud.with(|c| c.faults.no_capacity.insert("t3.small".into()));
    let build = run(&cloud.ports(), &request("exec-1")).expect("builds on the second type");
    assert_eq!(build.builder.expect("builder").instance_type, "t3a.small");
}

#[test]
fn a_second_start_is_told_which_build_holds_the_lock() {
    let cloud = cloud();
    let first =
        block_on(launch_builder::start(&cloud.ports(), &request("exec-1"))).expect("first start");
    let err =
        block_on(launch_builder::start(&cloud.ports(), &request("exec-2"))).expect_err("locked");
    assert_eq!(err.kind, ErrorKind::Locked);
    assert!(err.message.contains(&first.id.0), "{}", err.message);
    assert_eq!(
        block_on(cloud.store().builds("al2023-base"))
            .expect("builds")
            .len(),
        1,
        "the refused start created no build"
    );
}

#[test]
fn every_operation_invoked_twice_creates_nothing_twice() {
    // GIVEN a build driven with every start and check called twice (a retried Lambda)
    let cloud = cloud();
    let ports = cloud.ports();
    let req = request("exec-1");
    let b = block_on(launch_builder::start(&ports, &req)).expect("start");
    let again = block_on(launch_builder::start(&ports, &req)).expect("start again");
    assert_eq!(again.id, b.id, "the retried start continues the same build");
    let b = block_on(launch_builder::check(&ports, b)).expect("check");
    let b = block_on(launch_builder::check(&ports, b)).expect("check again");
    let b = block_on(customize::start(&ports, b)).expect("customize");
    let b = block_on(customize::start(&ports, b)).expect("customize again");
    let b = block_on(customize::check(&ports, b)).expect("customize check");
    let b = block_on(snapshot::start(&ports, b)).expect("snapshot");
    let b = block_on(snapshot::start(&ports, b)).expect("snapshot again");
    let b = block_on(snapshot::check(&ports, b)).expect("image created");
    let lost_update = b.clone();
    let b = block_on(snapshot::check(&ports, b)).expect("image available");
    // A check retried with the input from before its image was recorded finds it by tag.
    let _ = block_on(snapshot::check(
        &ports,
        Build {
            image: None,
            ..lost_update
        },
    ))
    .expect("stale check");
    let b = block_on(test_image::start(&ports, b)).expect("test");
    let b = block_on(test_image::start(&ports, b)).expect("test again");
    let b = until_ready(b, |b| block_on(test_image::check(&ports, b))).expect("tests pass");
    let b = block_on(distribute::begin(&ports, b)).expect("distribute");
    let e1 = block_on(distribute::start(&ports, &b, "eu-central-1")).expect("copy");
    let e2 = block_on(distribute::start(&ports, &b, "eu-central-1")).expect("copy again");
    assert_eq!(
        e1.image, e2.image,
        "CopyImage with the same client token copies once"
    );
    // THEN one builder, one test instance, one image per region, one command per stage
    cloud.with(|c| {
        assert_eq!(c.launches, 2);
        assert_eq!(c.commands.len(), 2);
    });
    let mut images = cloud.build_images();
    images.sort();
    assert_eq!(images.iter().filter(|(r, _)| r == "us-east-1").count(), 1);
    assert_eq!(
        images.iter().filter(|(r, _)| r == "eu-central-1").count(),
        1
    );
}

/// Each injected failure: (what to break, the error the build must end with).
fn inject(cloud: &MemoryCloud, stage: &str) -> ErrorKind {
    cloud.with(|c| match stage {
        "launch" => {
            c.faults
                .no_capacity
                .extend(["t3.small", "t3a.small", "m5.large"].map(String::from));
            ErrorKind::Capacity
        }
        "customize" => {
            c.faults.command_fails.insert(
                "build".into(),
                CommandStatus::Failed {
                    message: "component harden, step DisableRootLogin: exit code 2".into(),
                    output_tail: "sed: no such file".into(),
                },
            );
            ErrorKind::ComponentFailed
        }
        "snapshot" => {
            c.faults.image_fails = true;
            ErrorKind::Internal
        }
        "test" => {
            c.faults.command_fails.insert(
                "test".into(),
                CommandStatus::Failed {
                    message: "component smoke, step SshdConfigValid: exit code 255".into(),
                    output_tail: "sshd: bad config".into(),
                },
            );
            ErrorKind::TestFailed
        }
        _ => {
            c.faults.copy_fails.insert("eu-central-1".into());
            ErrorKind::Internal
        }
    })
}

#[test]
fn a_failure_at_any_stage_ends_failed_with_nothing_left_behind() {
    for stage in ["launch", "customize", "snapshot", "test", "distribute"] {
        // GIVEN a failure injected at one stage
        let cloud = cloud();
        let want = inject(&cloud, stage);
        // WHEN the build runs and the state machine's Catch runs cleanup
        let (build, err) = run(&cloud.ports(), &request("exec-1")).expect_err(stage);
        // THEN the error has the expected kind, the build is FAILED with the reason
        assert_eq!(err.kind, want, "{stage}: {err}");
        let stored = block_on(cloud.ports().store.build(&build.pipeline, &build.id))
            .expect("read")
            .expect("stored");
        assert_eq!(stored.status, BuildStatus::Failed, "{stage}");
        let failure = stored.failure.expect("failure context");
        assert_eq!(failure.error, want.error_type(), "{stage}");
        assert!(!failure.message.is_empty());
        // AND no instance runs, no image of the build remains in any region, the lock is free
        assert!(
            cloud.live_instances().is_empty(),
            "{stage}: instances left: {:?}",
            cloud.live_instances()
        );
        assert!(
            cloud.build_images().is_empty(),
            "{stage}: images left: {:?}",
            cloud.build_images()
        );
        assert!(cloud.lock_free("al2023-base"), "{stage}: lock held");
        // AND no snapshot but the parent's (EC2 keeps an image's snapshots unless deleted)
        let snapshots = cloud.with(|c| c.snapshots.clone());
        assert_eq!(snapshots.len(), 1, "{stage}: snapshots left: {snapshots:?}");
        assert_eq!(
            cloud.with(|c| c.events.last().map(|e| e.state)),
            Some(BuildStatus::Failed)
        );
        // AND cleanup is idempotent
        let again = block_on(cleanup::run(
            &cloud.ports(),
            build,
            err.error_type(),
            &err.message,
        ))
        .expect("cleanup again");
        assert_eq!(again.status, BuildStatus::Failed);
    }
}

#[test]
fn a_stale_retry_cannot_move_a_build_backwards() {
    let cloud = cloud();
    let build = run(&cloud.ports(), &request("exec-1")).expect("build");
    let stale = Build {
        status: BuildStatus::Building,
        ..build.clone()
    };
    let err = block_on(
        cloud
            .ports()
            .store
            .save_build(&stale, BuildStatus::Building),
    )
    .expect_err("rejected");
    assert_eq!(err.code.as_deref(), Some("ConditionalCheckFailedException"));
    let stored = block_on(cloud.ports().store.build(&build.pipeline, &build.id))
        .expect("read")
        .expect("stored");
    assert_eq!(stored.status, BuildStatus::Available);
}

#[test]
fn throttling_is_retryable_and_named_for_the_state_machine() {
    let cloud = cloud();
    cloud.with(|c| c.faults.throttle_next = 1);
    let err =
        block_on(launch_builder::start(&cloud.ports(), &request("exec-1"))).expect_err("throttled");
    assert_eq!(err.error_type(), "Kiln.Retryable");
    assert_eq!(err.code.as_deref(), Some("RequestLimitExceeded"));
    // The state machine retries the same input: the retry continues the same build.
    let build = block_on(launch_builder::start(&cloud.ports(), &request("exec-1"))).expect("retry");
    assert!(build.builder.is_some());
    assert_eq!(
        block_on(cloud.store().builds("al2023-base"))
            .expect("builds")
            .len(),
        1
    );
}

#[test]
fn the_in_memory_cloud_finds_a_parent_as_describe_images_does() {
    // GIVEN Amazon's images of two architectures, created in an order their ids do not follow,
    // one that is not available, and an image of the account's own with a matching name
    let cloud = MemoryCloud::new();
    let at =
        |day: u32| chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 1, day, 0, 0, 0).unwrap();
    let add = |name: &str, owner: &str, arch: &str, day: u32| {
        cloud.add_image_as("us-east-1", name, owner, arch, at(day))
    };
    let newest = add(
        "al2023-ami-2023.9-x86_64",
        kiln_testkit::AMAZON,
        "x86_64",
        9,
    );
    add(
        "al2023-ami-2023.6-x86_64",
        kiln_testkit::AMAZON,
        "x86_64",
        6,
    );
    add(
        "al2023-ami-2023.10-arm64",
        kiln_testkit::AMAZON,
        "arm64",
        10,
    );
    add(
        "al2023-ami-2023.11-x86_64",
        kiln_testkit::ACCOUNT,
        "x86_64",
        11,
    );
    let pending = add(
        "al2023-ami-2023.12-x86_64",
        kiln_testkit::AMAZON,
        "x86_64",
        12,
    );
    cloud.with(|c| {
        c.images.get_mut(&pending).expect("image").state = kiln::ports::ImageState::Pending
    });
    add(
        "al2023-ami-minimal-2023.13-x86_64-extra",
        kiln_testkit::AMAZON,
        "x86_64",
        13,
    );
    let find = |owners: &[&str], name: &str, arch| {
        block_on(cloud.ports().compute.latest_image(
            "us-east-1",
            &ParentFilter {
                owners: owners.iter().map(|o| o.to_string()).collect(),
                name: name.into(),
                architecture: arch,
            },
        ))
        .expect("latest")
    };
    // THEN the newest available image matching owner, name pattern and architecture
    let x86 = Some(kiln::model::pipeline::Architecture::X86_64);
    assert_eq!(
        find(&["amazon"], "al2023-ami-*-x86_64", x86),
        Some(newest.clone())
    );
    // AND `self` is the account's own; an account id names its owner
    assert_ne!(
        find(&["self"], "al2023-ami-*-x86_64", x86),
        Some(newest.clone())
    );
    assert_eq!(
        find(&[kiln_testkit::AMAZON], "al2023-ami-2023.?-x86_64", x86),
        Some(newest)
    );
    // AND architecture and the whole-name pattern are honoured
    let arm = find(
        &["amazon"],
        "al2023-ami-*",
        Some(kiln::model::pipeline::Architecture::Arm64),
    );
    assert_eq!(
        arm.map(|i| cloud.with(|c| c.images[&i].name.clone()))
            .as_deref(),
        Some("al2023-ami-2023.10-arm64")
    );
    assert_eq!(
        find(&["amazon"], "al2023-ami-2023", None),
        None,
        "a pattern matches whole names"
    );
}

#[test]
fn a_parent_that_is_missing_unavailable_or_of_another_architecture_fails_before_anything_launches()
{
    // Each case makes (or names) the parent the pipeline's parameter will point at.
    type Setup = fn(&MemoryCloud) -> String;
    let cases: [(&str, Setup, &str); 3] = [
        (
            "missing",
            |_| "ami-0000000000000dead".into(),
            "does not exist in us-east-1",
        ),
        (
            "pending",
            |cloud| {
                let id = cloud.add_image("us-east-1", "al2023-ami-2023.7");
                cloud.with(|c| c.images.get_mut(&id).expect("image").pending_checks = 100);
                id.0
            },
            "is not available in us-east-1: pending",
        ),
        (
            "arm64",
            |cloud| {
                let image = "al2023-ami-2023.7-arm64";
                let now = chrono::Utc::now();
                cloud
                    .add_image_as("us-east-1", image, kiln_testkit::AMAZON, "arm64", now)
                    .0
            },
            "is arm64, which instance types t3.small, t3a.small, m5.large cannot run",
        ),
    ];
    for (case, setup, want) in cases {
        // GIVEN the pipeline's parameter pointing at such a parent
        let cloud = cloud();
        let parent = setup(&cloud);
        block_on(
            cloud
                .ports()
                .parameters
                .put("us-east-1", PARENT_PARAM, &parent),
        )
        .expect("param");
        // WHEN the build starts
        let (build, err) = run(&cloud.ports(), &request("exec-1")).expect_err(case);
        // THEN it is FAILED, naming the AMI and why, and nothing was launched
        assert_eq!(err.kind, ErrorKind::InvalidPipeline, "{case}: {err}");
        assert!(err.message.contains(&parent), "{case}: {err}");
        assert!(err.message.contains(want), "{case}: {err}");
        assert!(
            err.message
                .contains(&format!("parent.ssmParameter {PARENT_PARAM}")),
            "{case}: {err}"
        );
        assert_eq!(build.status, BuildStatus::Failed, "{case}");
        assert!(cloud.with(|c| c.instances.is_empty()), "{case}: launched");
        assert!(cloud.lock_free("al2023-base"), "{case}: lock held");
    }
}

/// The reaper's cleanup (`cleanup::reap`, run when an execution ended outside kiln's Catch): a
/// build stopped mid-way gets the cleanup its Catch would have run — the builder terminated, the
/// build CANCELLED with the reason, the lock free; a second call changes nothing; an AVAILABLE
/// build keeps its images, and a request id no build carries finds nothing.
#[test]
fn reaping_a_stopped_build_cancels_it_once_and_leaves_finished_builds_alone() {
    // GIVEN a build stopped while its component runs
    let cloud = cloud();
    let ports = cloud.ports();
    let b = block_on(launch_builder::start(&ports, &request("stopped-1"))).expect("start");
    let b = until_ready(b, |b| block_on(launch_builder::check(&ports, b))).expect("launched");
    let b = block_on(customize::start(&ports, b)).expect("customize");
    assert_eq!(cloud.live_instances().len(), 1);
    assert!(!cloud.lock_free("al2023-base"));
    // WHEN it is reaped as a stopped execution
    let reaped = block_on(cleanup::reap(
        &ports,
        Some("al2023-base"),
        "stopped-1",
        "Kiln.Cancelled",
        "the execution was stopped (ABORTED)",
    ))
    .expect("reaped");
    // THEN it is CANCELLED with the reason, nothing runs, the lock is free
    assert!(reaped.concluded, "{reaped:?}");
    assert_eq!(reaped.was, Some(b.status));
    let stored = block_on(ports.store.build("al2023-base", &b.id))
        .expect("read")
        .expect("the build");
    assert_eq!(stored.status, BuildStatus::Cancelled);
    let failure = stored.failure.clone().expect("the reason");
    assert_eq!(
        (failure.stage.as_str(), failure.message.as_str()),
        ("customize", "the execution was stopped (ABORTED)")
    );
    assert!(cloud.live_instances().is_empty());
    assert!(cloud.lock_free("al2023-base"));
    // AND a second call changes nothing
    let again = block_on(cleanup::reap(
        &ports,
        None,
        "stopped-1",
        "Kiln.Cancelled",
        "again",
    ))
    .expect("reaped again");
    assert!(!again.concluded, "{again:?}");
    let after = block_on(ports.store.build("al2023-base", &b.id))
        .expect("read")
        .expect("the build");
    assert_eq!(after, stored);
    // AND an AVAILABLE build keeps its images; an unknown request id finds nothing
    let available = run(&ports, &request("ok-1")).expect("a build");
    let images = cloud.build_images().len();
    assert!(images > 0);
    let kept = block_on(cleanup::reap(
        &ports,
        Some("al2023-base"),
        "ok-1",
        "States.Runtime",
        "failed",
    ))
    .expect("reaped");
    assert_eq!(
        (kept.was, kept.now, kept.concluded),
        (
            Some(BuildStatus::Available),
            Some(BuildStatus::Available),
            false
        )
    );
    assert_eq!(cloud.build_images().len(), images);
    assert_eq!(
        block_on(ports.store.build("al2023-base", &available.id))
            .expect("read")
            .expect("the build")
            .status,
        BuildStatus::Available
    );
    let none = block_on(cleanup::reap(&ports, None, "never", "Kiln.Cancelled", "x"))
        .expect("nothing to reap");
    assert_eq!(none.build, None);
}
