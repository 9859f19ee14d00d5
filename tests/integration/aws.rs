//! The AWS ports on a moto server (real aws-sdk clients, real HTTP on 127.0.0.1): the port
//! contract for every method moto supports, cleanup of a failed build, `kiln run --backend aws`
//! and lifecycle. Whole builds through the deployed stack, with faults at every stage, are the
//! deployment rehearsal's (tests/integration/rehearsal.rs). moto has no pending images and reports
//! every SSM command as Success: those behaviours are covered by the in-memory cloud
//! (tests/integration/stages.rs) and by the rehearsal's faults injected at moto.

use std::sync::Arc;

use kiln::aws::{AwsPorts, Settings};
use kiln::model::build::{BuildId, BuildStatus, Trigger, TriggerKind};
use kiln::model::build::{CommandId, InstanceId};
use kiln::model::pipeline::{Architecture, ParentFilter};
use kiln::ports::{CommandPlan, CommandStatus, Commands, Compute, PortResult, Ports, Store};
use kiln::ports::{ImageState, InstanceState, PipelineRecord};
use kiln::stages::{cleanup, customize, launch_builder, snapshot, StartRequest};

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

/// The parent AMI under the example's public parameter: moto's, or one of moto's public AMIs
/// published there when moto has none.
async fn parent_image(p: &Ports<'_>) -> kiln::model::build::ImageId {
    if let Some(id) = p
        .parameters
        .get("us-east-1", PARENT_PARAM)
        .await
        .expect("get")
    {
        return kiln::model::build::ImageId(id);
    }
    publish_public_ami(p, PARENT_PARAM).await
}

/// One of moto's public x86_64 AMIs (the tests' pipelines run t3 instances), published in the
/// account's parameter `param` (us-east-1). The architecture is asked for, not assumed: moto dates
/// its stock images when it starts, so "the newest Amazon image" was arm64 on some machines.
pub(crate) async fn publish_public_ami(p: &Ports<'_>, param: &str) -> kiln::model::build::ImageId {
    let any = p
        .compute
        .latest_image(
            "us-east-1",
            &ParentFilter {
                owners: vec!["amazon".into()],
                name: "*".into(),
                architecture: Some(Architecture::X86_64),
            },
        )
        .await
        .expect("images")
        .expect("moto has public x86_64 AMIs");
    p.parameters
        .put("us-east-1", param, any.as_str())
        .await
        .expect("put");
    any
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
    parent_image(p).await;
    record
}

struct Env {
    _moto: Moto,
    ports: Arc<AwsPorts>,
    rt: tokio::runtime::Runtime,
}

fn env() -> Env {
    env_on(Moto::start())
}

/// Regression: on a fresh machine `make test` failed 2 of 195 with "the parent image … is arm64,
/// which instance type t3.small cannot run": the tests published "the newest Amazon-owned image"
/// of moto, and moto dates its stock images when it starts, so which one was newest depended on
/// timing. Here a newer Amazon-owned arm64 image exists for sure.
#[test]
fn the_tests_publish_an_x86_64_parent_when_a_newer_amazon_arm64_image_exists() {
    // GIVEN moto whose Amazon-owned images are an x86_64 one and a newer arm64 one
    let e = env_on(Moto::start_with_images(
        &repo().join("tests/data/aws/amis-newer-arm64.json"),
    ));
    let p = e.ports.ports();
    let newest = |architecture| ParentFilter {
        owners: vec!["amazon".into()],
        name: "*".into(),
        architecture,
    };
    let newest_of_all =
        e.rt.block_on(p.compute.latest_image("us-east-1", &newest(None)))
            .expect("images");
    assert_eq!(
        newest_of_all.map(|i| i.0).as_deref(),
        Some("ami-0a64000000000002"),
        "the trap: the newest Amazon-owned image is the arm64 one"
    );
    // WHEN the tests publish their parent
    let parent = e.rt.block_on(publish_public_ami(&p, "/kiln/tests/parent"));
    // THEN it is the x86_64 image, under the parameter
    assert_eq!(parent.0, "ami-0a86000000000001");
    let published =
        e.rt.block_on(p.parameters.get("us-east-1", "/kiln/tests/parent"))
            .expect("get");
    assert_eq!(published.as_deref(), Some("ami-0a86000000000001"));
}

fn env_on(moto: Moto) -> Env {
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
        stack: None,
        instance_profile: None,
    };
    let ports = Arc::new(rt.block_on(AwsPorts::from_env(settings)));
    // As a stack pins it (AgentSha256): the agent this checkout built.
    let agent = crate::support::built_binary("kiln-agent");
    ports.pin_agent(
        std::env::consts::ARCH,
        &kiln::digest::sha256_file(&agent).expect("agent digest"),
    );
    rt.block_on(ports.bootstrap()).expect("table and bucket");
    Env {
        _moto: moto,
        ports,
        rt,
    }
}

/// The store contract, for any implementation: run on DynamoDB (moto) here and on the
/// in-memory store below.
pub async fn store_contract(store: &dyn Store) {
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
        store.pipeline_names().await.expect("names"),
        ["al2023-base"],
        "listed once, whatever its versions"
    );
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
    // The definition applied last is the pipeline's, an older version applied again included
    // (`kiln run` of a file builds what the file says).
    let mut newer = record.clone();
    newer.pipeline.version = "2.2.0".into();
    store.put_pipeline(&newer).await.expect("a new version");
    assert_eq!(
        store.pipeline("al2023-base").await.expect("get"),
        Some(newer.clone())
    );
    store
        .put_pipeline(&record)
        .await
        .expect("the old one again");
    assert_eq!(
        store.pipeline("al2023-base").await.expect("get"),
        Some(record.clone()),
        "the version applied last"
    );
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
    let cloud = kiln_testkit::MemoryCloud::new();
    futures::executor::block_on(store_contract(&cloud));
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

/// The parameters contract (SSM Parameter Store's semantics, which the parent-image trigger and
/// the distribution's `ssmParameter` outputs rely on), for any implementation: SSM on moto, the
/// embedded cloud's files, the in-memory one.
pub async fn parameters_contract(p: &dyn kiln::ports::Parameters) {
    let name = "/kiln/contract/latest";
    assert_eq!(
        p.get("us-east-1", name).await.expect("get"),
        None,
        "missing"
    );
    p.put("us-east-1", name, "ami-0123456789abcdef0")
        .await
        .expect("put");
    assert_eq!(
        p.get("us-east-1", name).await.expect("get").as_deref(),
        Some("ami-0123456789abcdef0")
    );
    // A new value replaces the old one (PutParameter with Overwrite).
    p.put("us-east-1", name, "ami-0fedcba9876543210")
        .await
        .expect("overwrite");
    assert_eq!(
        p.get("us-east-1", name).await.expect("get").as_deref(),
        Some("ami-0fedcba9876543210")
    );
    // Parameters are regional.
    assert_eq!(p.get("eu-west-1", name).await.expect("get"), None);
    p.put("eu-west-1", name, "ami-0aaaaaaaaaaaaaaaa")
        .await
        .expect("put");
    assert_eq!(
        p.get("us-east-1", name).await.expect("get").as_deref(),
        Some("ami-0fedcba9876543210")
    );
}

#[test]
fn parameters_contract_on_ssm() {
    let e = env();
    e.rt.block_on(parameters_contract(&*e.ports));
}

#[test]
fn parameters_contract_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud =
        kiln::local::LocalCloud::open(dir.path(), &crate::support::built_binary("kiln-agent"))
            .expect("open");
    futures::executor::block_on(parameters_contract(&cloud));
}

#[test]
fn parameters_contract_in_memory() {
    futures::executor::block_on(parameters_contract(&kiln_testkit::MemoryCloud::new()));
}

#[test]
fn store_contract_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = kiln::local::SqliteStore::open(&dir.path().join("state.db")).expect("open");
    futures::executor::block_on(store_contract(&store));
}

/// The instance profile the `kiln run --backend aws` tests name (`--instance-profile`).
const RUN_PROFILE: &str = "kiln-run-builder";

/// An instance profile in moto's IAM, as an account administrator makes one for `kiln run
/// --backend aws` (kiln creates no IAM role): its role may do what the SSM agent does to register
/// and take commands. moto refuses RunInstances naming a profile it does not have, as EC2 does,
/// and its SSM answers Online only for an instance whose role may register
/// (tests/conformance/moto_gaps.py).
fn create_instance_profile(name: &str) {
    const SCRIPT: &str = r#"
import boto3, json, sys
iam = boto3.client("iam", region_name="us-east-1")
name = sys.argv[1]
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
agent = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["ssm:UpdateInstanceInformation", "ssmmessages:*", "ec2messages:*"], "Resource": "*"}]}
iam.put_role_policy(RoleName=name, PolicyName="ssm-agent", PolicyDocument=json.dumps(agent))
iam.create_instance_profile(InstanceProfileName=name)
iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
"#;
    let out = std::process::Command::new(crate::rehearsal::python())
        .args(["-c", SCRIPT, name])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "create_instance_profile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every instance moto ever launched in `region` (terminated ones included): raw
/// DescribeInstances, not kiln's filters.
async fn all_instances(e: &Env, region: &str) -> Vec<String> {
    let out = e
        .ports
        .ec2(region)
        .describe_instances()
        .send()
        .await
        .expect("DescribeInstances");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect()
}

/// `parent.filter` on EC2 (moto): the newest image of the given owners whose name matches and,
/// when given, whose architecture is the one asked for — and the launch stage builds on it. The
/// images and their creation dates are the test's own (tests/data/aws/amis-parent-filter.json),
/// so "newest" does not depend on when moto started.
#[test]
fn parent_filter_on_moto_takes_the_newest_image_of_its_owners_name_and_architecture() {
    let e = env_on(Moto::start_with_images(
        &repo().join("tests/data/aws/amis-parent-filter.json"),
    ));
    let p = e.ports.ports();
    let filter = |owners: &[&str], name: &str, architecture| ParentFilter {
        owners: owners.iter().map(|o| o.to_string()).collect(),
        name: name.into(),
        architecture,
    };
    let pick = |f: &ParentFilter| {
        e.rt.block_on(p.compute.latest_image("us-east-1", f))
            .expect("DescribeImages")
            .map(|i| i.0)
    };
    let x86 = Some(Architecture::X86_64);
    let cases = [
        // The newest x86_64 match of Amazon, not the newer arm64 one, not the newer other name.
        (
            filter(&["amazon"], "golden-base-*", x86),
            Some("ami-0f00000000000002"),
        ),
        (
            filter(&["amazon"], "golden-base-*", Some(Architecture::Arm64)),
            Some("ami-0f00000000000003"),
        ),
        // No architecture: the newest match of any.
        (
            filter(&["amazon"], "golden-base-*", None),
            Some("ami-0f00000000000003"),
        ),
        // Another owner's newer image counts only when that owner is named.
        (
            filter(&["amazon", "099720109477"], "golden-base-*", x86),
            Some("ami-0f00000000000005"),
        ),
        (
            filter(&["099720109477"], "golden-base-*", x86),
            Some("ami-0f00000000000005"),
        ),
        // `?` matches one character; nothing matches: none.
        (
            filter(&["amazon"], "golden-base-2026.0?-x86_64", x86),
            Some("ami-0f00000000000001"),
        ),
        (filter(&["amazon"], "nothing-*", None), None),
    ];
    for (f, want) in &cases {
        assert_eq!(pick(f).as_deref(), *want, "{f:?}");
    }
    // The launch stage resolves a pipeline's filter to that image and launches the builder on it.
    let commands = MotoCommands(&e.ports);
    let p = ports_of(&e.ports, &commands);
    e.rt.block_on(async {
        let mut record = apply_example(&p).await;
        record.pipeline.parent = kiln::model::pipeline::Parent::Filter(cases[0].0.clone());
        // Another definition: another version (versions are immutable).
        record.pipeline.version = "2.2.0".into();
        p.store.put_pipeline(&record).await.expect("apply");
        let req = StartRequest {
            pipeline: record.pipeline.name.clone(),
            trigger: Trigger {
                kind: TriggerKind::Manual,
                detail: None,
            },
            request_id: Some("exec-filter".into()),
        };
        let b = launch_builder::start(&p, &req).await.expect("start");
        assert_eq!(
            b.parent_image.as_ref().map(|i| i.0.as_str()),
            Some("ami-0f00000000000002")
        );
        assert!(b.builder.is_some());
        let id = b.id.clone();
        cleanup::run(&p, b, "Kiln.Cancelled", "the test is done")
            .await
            .expect("cleanup");
        assert!(p
            .compute
            .instances_of("us-east-1", &id)
            .await
            .expect("instances")
            .is_empty());
    });
}

/// moto's stand-in for SSM's managed-instance list refuses what AWS refuses (moto runs no agent):
/// an instance is Online only when its profile's role may register, by action (the IAM
/// evaluator), and its subnet reaches the SSM endpoints; each refused case has its control
/// (tests/conformance/check_agent_online.py).
#[test]
fn moto_answers_an_ssm_agent_online_only_when_aws_would() {
    let out = std::process::Command::new(crate::rehearsal::python())
        .arg(repo().join("tests/conformance/check_agent_online.py"))
        .env("KILN_AUTHZ_MODULES", Moto::evaluator_modules())
        .output()
        .expect("python");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every case ran: eight refusals, four controls.
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        12,
        "{text}"
    );
    assert_eq!(text.matches("expected False").count(), 8, "{text}");
}

/// `kiln run --backend aws` with no instance profile (none in the pipeline, no
/// `--instance-profile`) is refused before anything is created: in AWS the builder would never
/// come online (its SSM agent registers with the profile's role) and the build would wait out its
/// timeout with the instance running. The control: the same run naming a profile launches.
#[test]
fn kiln_run_backend_aws_without_an_instance_profile_is_refused_with_exit_2_and_nothing_created() {
    // GIVEN moto and the test pipeline, which names no instance profile
    let e = env_on(Moto::start());
    let p = e.ports.ports();
    e.rt.block_on(parent_image(&p));
    let home = tempfile::tempdir().expect("home");
    let pipeline = repo().join("tests/data/aws/moto-al2023/pipeline.yaml");
    let kiln = |extra: &[&str]| {
        std::process::Command::new(crate::support::built_binary("kiln"))
            .arg("--home")
            .arg(home.path())
            .args([
                "run",
                "--backend",
                "aws",
                "--artifacts-bucket",
                "kiln-refused",
            ])
            .args(extra)
            .arg(&pipeline)
            .env_remove("KILN_HOME")
            .env_remove("KILN_AGENT")
            .output()
            .expect("kiln run")
    };
    // WHEN it runs with no profile
    let out = kiln(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // THEN exit 2, naming the field and the flag, and nothing was created: no instance, no bucket
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("infrastructure.instanceProfile") && stderr.contains("--instance-profile"),
        "{stderr}"
    );
    assert!(e.rt.block_on(all_instances(&e, "us-east-1")).is_empty());
    let buckets = e.rt.block_on(async {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&config)
                .force_path_style(true)
                .build(),
        );
        let out = s3.list_buckets().send().await.expect("ListBuckets");
        out.buckets()
            .iter()
            .filter_map(|b| b.name().map(str::to_string))
            .collect::<Vec<_>>()
    });
    assert!(
        !buckets.iter().any(|b| b == "kiln-refused"),
        "the artifacts bucket was created: {buckets:?}"
    );
    // AND a profile name kiln cannot pass is refused as usage (exit 2)
    let out = kiln(&["--instance-profile", "no spaces; rm -rf /"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(e.rt.block_on(all_instances(&e, "us-east-1")).is_empty());
    // The control: named, the run builds. Its builder and test instance came online, which moto
    // answers only for an instance whose profile's role may register (the test before this
    // one); moto drops the association when an instance terminates, so it is not read back.
    create_instance_profile(RUN_PROFILE);
    let out = kiln(&["--instance-profile", RUN_PROFILE, "--output", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("summary JSON");
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    assert!(e.rt.block_on(all_instances(&e, "us-east-1")).len() >= 2);
}

/// `kiln run --backend aws`: the real kiln binary runs the state machine with the stage code over
/// EC2, SSM and S3 (a moto server; moto runs no agent, so commands report Success) and keeps the
/// build in its local store.
#[test]
fn kiln_run_backend_aws_builds_shares_and_publishes_in_two_regions_on_moto() {
    // GIVEN moto (with the SSM inventory moto lacks) and the example's parent parameter published
    let e = env_on(Moto::start());
    let p = e.ports.ports();
    let parent = e.rt.block_on(parent_image(&p));
    let home = tempfile::tempdir().expect("home");
    create_instance_profile(RUN_PROFILE);
    // WHEN kiln runs the pipeline against it
    let out = std::process::Command::new(crate::support::built_binary("kiln"))
        .arg("--home")
        .arg(home.path())
        .args([
            "run",
            "--backend",
            "aws",
            "--artifacts-bucket",
            "kiln-run-artifacts",
            "--instance-profile",
            RUN_PROFILE,
            "--output",
            "json",
        ])
        .arg(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .env_remove("KILN_HOME")
        .env_remove("KILN_AGENT")
        .output()
        .expect("kiln run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // THEN the build is AVAILABLE with an image in each region
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("summary JSON");
    assert_eq!(summary["status"], "AVAILABLE", "{summary}");
    let images = summary["images"].as_object().expect("images").clone();
    assert_eq!(images.len(), 2, "{summary}");
    e.rt.block_on(async {
        for (region, id) in &images {
            let id = kiln::model::build::ImageId(id.as_str().expect("id").to_string());
            assert_ne!(id, parent);
            // AND the image exists, is shared with the region's account, and is published
            assert_eq!(
                p.compute.image_state(region, &id).await.expect("state"),
                ImageState::Available
            );
            let attr = e
                .ports
                .ec2(region)
                .describe_image_attribute()
                .image_id(id.as_str())
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send()
                .await
                .expect("attribute");
            let accounts: Vec<String> = attr
                .launch_permissions()
                .iter()
                .filter_map(|l| l.user_id().map(str::to_string))
                .collect();
            let want = if region == "us-east-1" {
                "111122223333"
            } else {
                "444455556666"
            };
            assert_eq!(accounts, [want], "{region}");
            assert_eq!(
                p.parameters
                    .get(region, "/images/al2023-moto/latest")
                    .await
                    .expect("get")
                    .as_deref(),
                Some(id.as_str())
            );
        }
        // AND no instance of the build is left, and the build is recorded locally
        let store = kiln::local::SqliteStore::open(&home.path().join("state.db")).expect("store");
        let builds = store.builds("al2023-moto").await.expect("builds");
        assert_eq!(builds.len(), 1);
        assert_eq!(builds[0].status, BuildStatus::Available);
        for region in ["us-east-1", "eu-central-1"] {
            assert!(p
                .compute
                .instances_of(region, &builds[0].id)
                .await
                .expect("instances")
                .is_empty());
        }
    });
}

/// Lifecycle on moto (`kiln lifecycle --backend aws --dry-run`, then the stack's daily run): old
/// images deregistered (snapshots deleted) in every region the pipeline distributes to, the
/// newest kept, images tagged to be kept left alone.
#[test]
fn lifecycle_on_moto_deregisters_old_images_in_every_region_and_keeps_excluded_ones() {
    let e = env_on(Moto::start());
    let p = e.ports.ports();
    e.rt.block_on(parent_image(&p));
    create_instance_profile(RUN_PROFILE);
    let home = tempfile::tempdir().expect("home");
    // A copy of the test pipeline that builds every time and keeps one image.
    let file = home.path().join("pipeline.yaml");
    let text = std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .expect("read")
        .replace(
            "../../../../examples/aws-al2023/components/harden.yaml",
            &repo().join("examples/aws-al2023/components/harden.yaml").display().to_string(),
        )
        + "schedule:\n  startCondition: always\nlifecycle:\n  keepLatest: 1\n  excludeTags:\n    keep: \"true\"\n";
    std::fs::write(&file, text).expect("write");
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(crate::support::built_binary("kiln"))
            .arg("--home")
            .arg(home.path())
            .args(args)
            .env_remove("KILN_HOME")
            .output()
            .expect("kiln");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<serde_json::Value>(&text).expect("JSON")
    };
    let f = file.display().to_string();
    let builds: Vec<serde_json::Value> = (0..3)
        .map(|_| {
            kiln(&[
                "run",
                &f,
                "--backend",
                "aws",
                "--artifacts-bucket",
                "kiln-lc",
                "--instance-profile",
                RUN_PROFILE,
                "--output",
                "json",
            ])["images"]
                .clone()
        })
        .collect();
    // The oldest image in eu-central-1 is marked to be kept.
    let keep = builds[0]["eu-central-1"].as_str().expect("id").to_string();
    e.rt.block_on(async {
        e.ports
            .ec2("eu-central-1")
            .create_tags()
            .resources(&keep)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("keep")
                    .value("true")
                    .build(),
            )
            .send()
            .await
            .expect("tag");
    });
    // `kiln lifecycle --dry-run` says what would go and changes nothing
    let plan = kiln(&[
        "lifecycle",
        &f,
        "--backend",
        "aws",
        "--dry-run",
        "--output",
        "json",
    ]);
    let actions = plan["actions"].as_array().expect("actions");
    assert_eq!(actions.len(), 3, "{plan}");
    let count = |region: &'static str| {
        e.rt.block_on(p.compute.pipeline_images(region, "al2023-moto"))
            .expect("images")
            .len()
    };
    assert_eq!((count("us-east-1"), count("eu-central-1")), (3, 3));
    // The daily run of the stack (the cleanup function's `lifecycle` operation) applies it,
    // for the pipelines applied to the table.
    let loaded = kiln::model::load(&file).expect("valid");
    let report = e.rt.block_on(async {
        p.store
            .put_pipeline(&PipelineRecord::from(&loaded))
            .await
            .expect("apply");
        kiln::stages::handler::handle(
            &p,
            kiln::stages::handler::Function::Cleanup,
            serde_json::json!({"op": "lifecycle"}),
        )
        .await
        .expect("daily run")
    });
    assert_eq!(
        report["actions"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert_eq!(report["failed"], serde_json::json!([]));
    e.rt.block_on(async {
        for region in ["us-east-1", "eu-central-1"] {
            let left: Vec<String> = p
                .compute
                .pipeline_images(region, "al2023-moto")
                .await
                .expect("images")
                .into_iter()
                .map(|i| i.id.0)
                .collect();
            let mut want = vec![builds[2][region].as_str().expect("id").to_string()];
            if region == "eu-central-1" {
                want.push(keep.clone());
            }
            let (mut left, mut want) = (left, want);
            left.sort();
            want.sort();
            assert_eq!(left, want, "{region}");
        }
        // The deregistered images' snapshots are gone too.
        let snapshots = e
            .ports
            .ec2("us-east-1")
            .describe_snapshots()
            .owner_ids("self")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:kiln:pipeline")
                    .values("al2023-moto")
                    .build(),
            )
            .send()
            .await
            .expect("snapshots");
        assert_eq!(
            snapshots.snapshots().len(),
            1,
            "only the kept image's snapshot"
        );
    });
}
