//! The AWS ports on a moto server (real aws-sdk clients, real HTTP on 127.0.0.1): the port
//! contract for every method moto supports, and a whole build driven through the stages.
//! moto ignores ClientToken, has no pending images and reports every SSM command as Success:
//! those behaviours are covered by the in-memory cloud (tests/integration/stages.rs).

use std::sync::Arc;

use kiln::aws::{AwsPorts, Settings};
use kiln::model::build::{BuildId, BuildStatus, Trigger, TriggerKind};
use kiln::model::build::{CommandId, InstanceId};
use kiln::model::pipeline::ParentFilter;
use kiln::ports::{CommandPlan, CommandStatus, Commands, Compute, PortResult, Ports};
use kiln::ports::{ImageState, InstanceState, PipelineRecord};
use kiln::stages::{
    cleanup, customize, distribute, launch_builder, snapshot, test_image, StartRequest,
};

use crate::support::{repo, Moto};

const PARENT_PARAM: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// moto has no DescribeInstanceInformation: this port-level fake says an instance's agent is
/// online when EC2 reports it running, and sends and reads commands through the real SSM port.
struct MotoCommands<'a>(&'a AwsPorts);

impl Commands for MotoCommands<'_> {
    fn agent_online<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool> {
        Box::pin(async move {
            Ok(self.0.instance_state(region, instance).await? == InstanceState::Running)
        })
    }
    fn send<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId> {
        self.0.send(region, instance, plan)
    }
    fn status<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus> {
        self.0.status(region, instance, command)
    }
}

fn ports_of<'a>(aws: &'a AwsPorts, commands: &'a MotoCommands<'a>) -> Ports<'a> {
    Ports {
        commands,
        ..aws.ports()
    }
}

/// Applies the AWS example, adapted to moto (no subnets, security groups, profiles, launch
/// templates or KMS keys of those ids), and publishes a parent AMI under the example's public
/// parameter when moto does not provide it.
async fn apply_example(p: &Ports<'_>) -> PipelineRecord {
    let loaded =
        kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml")).expect("valid");
    let mut record = PipelineRecord::from(&loaded);
    record.pipeline.infrastructure.subnet_id = None;
    record.pipeline.infrastructure.security_group_ids.clear();
    record.pipeline.infrastructure.instance_profile = None;
    for d in &mut record.pipeline.distribution {
        d.launch_templates.clear();
        d.kms_key_id = None;
    }
    p.store.put_pipeline(&record).await.expect("apply");
    if p.parameters
        .get("us-east-1", PARENT_PARAM)
        .await
        .expect("get")
        .is_none()
    {
        let any = p
            .compute
            .latest_image(
                "us-east-1",
                &ParentFilter {
                    owners: vec!["amazon".into()],
                    name: "*".into(),
                    architecture: None,
                },
            )
            .await
            .expect("images")
            .expect("moto has public AMIs");
        p.parameters
            .put("us-east-1", PARENT_PARAM, any.as_str())
            .await
            .expect("put");
    }
    record
}

struct Env {
    _moto: Moto,
    ports: Arc<AwsPorts>,
    rt: tokio::runtime::Runtime,
}

fn env() -> Env {
    let moto = Moto::start();
    for (k, v) in moto.env() {
        // Each nextest test runs in its own process, so the environment is this test's alone.
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_MAX_ATTEMPTS", "2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let settings = Settings {
        table: "kiln".into(),
        bucket: "kiln-artifacts".into(),
        event_bus: "default".into(),
        region: "us-east-1".into(),
    };
    let ports = Arc::new(rt.block_on(AwsPorts::from_env(settings)));
    rt.block_on(ports.bootstrap()).expect("table and bucket");
    Env {
        _moto: moto,
        ports,
        rt,
    }
}

/// The store contract, for any implementation: run on DynamoDB (moto) here and on the
/// in-memory store below.
pub async fn store_contract(store: &dyn kiln::ports::Store) {
    let loaded =
        kiln::model::load(&repo().join("examples/aws-al2023/pipeline.yaml")).expect("valid");
    let record = PipelineRecord::from(&loaded);
    // Pipelines: stored, read back, immutable per version.
    store.put_pipeline(&record).await.expect("put");
    store
        .put_pipeline(&record)
        .await
        .expect("same content again is fine");
    assert_eq!(
        store.pipeline("al2023-base").await.expect("get"),
        Some(record.clone())
    );
    assert_eq!(store.pipeline("nope").await.expect("get"), None);
    let mut changed = record.clone();
    changed.pipeline.description = Some("changed".into());
    let err = store
        .put_pipeline(&changed)
        .await
        .expect_err("immutable version");
    assert_eq!(err.error_type(), "Kiln.InvalidPipeline");
    // Builds: created once, read back, listed, moved forward only.
    let mut build: kiln::model::build::Build = serde_json::from_value(serde_json::json!({
        "id": BuildId::new_at(5).0, "pipeline": "al2023-base", "definitionVersion": "2.1.0", "buildNumber": 1,
        "trigger": {"kind": "manual"}, "status": "PENDING", "homeRegion": "us-east-1", "buildDate": "20260101000000"
    }))
    .expect("a build document");
    store.create_build(&build).await.expect("create");
    store
        .create_build(&build)
        .await
        .expect("create again with the same content");
    build.status = BuildStatus::Building;
    store
        .save_build(&build, BuildStatus::Pending)
        .await
        .expect("forward");
    let stale = kiln::model::build::Build {
        status: BuildStatus::Pending,
        ..build.clone()
    };
    assert!(
        store
            .save_build(&stale, BuildStatus::Pending)
            .await
            .is_err(),
        "a stale retry cannot move the build backwards"
    );
    assert_eq!(
        store
            .build("al2023-base", &build.id)
            .await
            .expect("get")
            .map(|b| b.status),
        Some(BuildStatus::Building)
    );
    assert_eq!(store.builds("al2023-base").await.expect("list").len(), 1);
    // Locks: one holder; the other is told who holds it; released only by the holder.
    let (a, b) = (BuildId::new_at(1), BuildId::new_at(2));
    let now = chrono::Utc::now();
    store
        .lock("al2023-base", &a, now, 3600)
        .await
        .expect("lock");
    store
        .lock("al2023-base", &a, now, 3600)
        .await
        .expect("re-entrant for the holder");
    let err = store
        .lock("al2023-base", &b, now, 3600)
        .await
        .expect_err("held");
    assert_eq!(err.error_type(), "Kiln.Locked");
    assert!(err.message.contains(a.as_str()), "{err}");
    store
        .unlock("al2023-base", &b)
        .await
        .expect("not the holder: no-op");
    assert!(store.lock("al2023-base", &b, now, 3600).await.is_err());
    store
        .lock("al2023-base", &b, now + chrono::Duration::hours(2), 3600)
        .await
        .expect("an expired lock is taken over");
    store.unlock("al2023-base", &b).await.expect("unlock");
}

#[test]
fn store_contract_on_dynamodb() {
    let e = env();
    e.rt.block_on(store_contract(&*e.ports));
}

#[test]
fn store_contract_in_memory() {
    let cloud = kiln::memory::MemoryCloud::new();
    futures::executor::block_on(store_contract(&cloud));
}

#[test]
fn a_build_runs_end_to_end_on_moto_and_leaves_only_the_images() {
    // GIVEN the AWS example applied, its parent from moto's public SSM parameter
    let e = env();
    let commands = MotoCommands(&e.ports);
    let p = ports_of(&e.ports, &commands);
    e.rt.block_on(async {
        let record = apply_example(&p).await;
        let req = StartRequest {
            pipeline: "al2023-base".into(),
            trigger: Trigger {
                kind: TriggerKind::Manual,
                detail: None,
            },
            request_id: Some("exec-1".into()),
        };
        // WHEN the stages run as the state machine runs them
        let b = launch_builder::start(&p, &req).await.expect("start");
        assert_eq!(
            p.compute
                .instance_state("us-east-1", &b.builder.clone().expect("builder").id)
                .await
                .expect("state"),
            InstanceState::Running
        );
        let b = launch_builder::check(&p, b).await.expect("check");
        let b = if b.ready {
            b
        } else {
            launch_builder::check(&p, b).await.expect("check")
        };
        let b = customize::start(&p, b).await.expect("customize");
        let b = customize::check(&p, b).await.expect("customize check");
        assert!(b.ready, "moto reports commands as Success");
        let b = snapshot::start(&p, b).await.expect("snapshot");
        let mut b = b;
        for _ in 0..5 {
            b = snapshot::check(&p, b).await.expect("snapshot check");
            if b.ready {
                break;
            }
        }
        assert!(b.ready);
        let b = test_image::start(&p, b).await.expect("test");
        let mut b = b;
        for _ in 0..5 {
            b = test_image::check(&p, b).await.expect("test check");
            if b.ready {
                break;
            }
        }
        let b = distribute::begin(&p, b).await.expect("begin");
        let mut regions = Vec::new();
        for d in &record.pipeline.distribution {
            let entry = distribute::start(&p, &b, &d.region).await.expect("copy");
            regions.push(distribute::check(&p, &b, entry).await.expect("share"));
        }
        let b = distribute::finish(&p, b, regions).await.expect("finish");
        // THEN the build is AVAILABLE in DynamoDB, each region has its image and parameter
        let stored = p
            .store
            .build("al2023-base", &b.id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.status, BuildStatus::Available);
        for r in &stored.regions {
            let image = r.image.clone().expect("image");
            assert_eq!(
                p.compute
                    .image_state(&r.region, &image)
                    .await
                    .expect("state"),
                ImageState::Available
            );
            assert_eq!(
                p.parameters
                    .get(&r.region, "/images/al2023-base/latest")
                    .await
                    .expect("param")
                    .as_deref(),
                Some(image.as_str())
            );
            assert_eq!(
                p.compute.images_of(&r.region, &b.id).await.expect("by tag"),
                vec![image.clone()],
                "tagged with the build id in {}",
                r.region
            );
        }
        let shared = e
            .ports
            .ec2("us-east-1")
            .describe_image_attribute()
            .image_id(stored.image.clone().expect("image").as_str())
            .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
            .send()
            .await
            .expect("attribute");
        let accounts: Vec<&str> = shared
            .launch_permissions()
            .iter()
            .filter_map(|l| l.user_id())
            .collect();
        assert_eq!(accounts, ["111122223333", "444455556666"]);
        // AND no instance of the build runs, and the lock is free for the next build
        assert!(p
            .compute
            .instances_of("us-east-1", &b.id)
            .await
            .expect("instances")
            .is_empty());
        p.store
            .lock("al2023-base", &BuildId::new_at(9), chrono::Utc::now(), 60)
            .await
            .expect("lock released");
        // AND the customize command carried no pipeline value in its shell text
        let cmds = e
            .ports
            .ssm("us-east-1")
            .list_commands()
            .send()
            .await
            .expect("commands");
        for c in cmds.commands() {
            let text = c
                .parameters()
                .and_then(|p| p.get("commands"))
                .map(|v| v.join("\n"))
                .unwrap_or_default();
            assert!(
                text.contains("kiln-agent run") && text.contains("--parameters-file params.json"),
                "{text}"
            );
            assert!(
                !text.contains("SshPort") && !text.contains("/tmp"),
                "values reach the agent as files:\n{text}"
            );
        }
    });
}

#[test]
fn cleanup_on_moto_terminates_and_deregisters_everything_of_a_failed_build() {
    let e = env();
    let commands = MotoCommands(&e.ports);
    let p = ports_of(&e.ports, &commands);
    e.rt.block_on(async {
        apply_example(&p).await;
        let req = StartRequest {
            pipeline: "al2023-base".into(),
            trigger: Trigger {
                kind: TriggerKind::Schedule,
                detail: None,
            },
            request_id: Some("exec-9".into()),
        };
        // GIVEN a build stopped half-way, with an image in the home region
        let b = launch_builder::start(&p, &req).await.expect("start");
        let b = snapshot::start(&p, customize::start(&p, b).await.expect("customize"))
            .await
            .expect("snapshot");
        let b = snapshot::check(&p, b).await.expect("image");
        assert!(b.image.is_some());
        // WHEN cleanup runs after a failure (twice: it is idempotent)
        let done = cleanup::run(&p, b.clone(), "Kiln.TestFailed", "component smoke failed")
            .await
            .expect("cleanup");
        cleanup::run(&p, b.clone(), "Kiln.TestFailed", "component smoke failed")
            .await
            .expect("cleanup again");
        // THEN nothing of the build remains and the record says why
        assert_eq!(done.status, BuildStatus::Failed);
        assert!(p
            .compute
            .instances_of("us-east-1", &b.id)
            .await
            .expect("instances")
            .is_empty());
        assert!(p
            .compute
            .images_of("us-east-1", &b.id)
            .await
            .expect("images")
            .is_empty());
        let stored = p
            .store
            .build("al2023-base", &b.id)
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.failure.expect("failure").error, "Kiln.TestFailed");
    });
}

#[test]
fn store_contract_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = kiln::local::SqliteStore::open(&dir.path().join("state.db")).expect("open");
    futures::executor::block_on(store_contract(&store));
}
