//! Refusals, proven: each deployed function's own role, with the credentials Lambda would hand
//! its bootstrap, asks for what it must not do, and is refused as AWS refuses it (the service's
//! error code) and by the rehearsal's IAM evaluator (the decision line for that very request says
//! denied). Every other rehearsal test asserts that nothing was denied; without this one, a
//! template that lost its `aws:ResourceTag/kiln:stack` or `ec2:CreateAction` conditions, or an
//! evaluator that answered "Allowed" to everything, would pass them all.
//!
//! Each refused request has a positive control: the same request on the same resource by a
//! principal that is allowed succeeds (the account's administrator, whose requests moto runs
//! unchecked, and the same role on a resource the stack tagged), so a refusal cannot come from a
//! missing resource or a malformed request.

use std::fmt::Debug;
use std::future::Future;
use std::process::Command;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    IamInstanceProfileSpecification, InstanceType, LaunchPermission, LaunchPermissionModifications,
    RequestLaunchTemplateData, ResourceType, Tag, TagSpecification,
};
use aws_sdk_ssm::types::ParameterType;
use serde_json::Value as Json;

use crate::rehearsal::{python, runtime, Rehearsal, STACK};
use crate::support::{repo, run_ok};

const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";

/// Every function of the stack, by logical id: the six stages, then wake and trigger.
const FUNCTIONS: [&str; 8] = [
    "LaunchBuilderFunction",
    "CustomizeFunction",
    "SnapshotFunction",
    "TestImageFunction",
    "DistributeFunction",
    "CleanupFunction",
    "WakeFunction",
    "TriggerFunction",
];

/// The functions the template grants `ssm:SendCommand` of AWS-RunShellScript (to the stack's
/// instances): for them a command to another instance is refused on the instance, for the others
/// already on the document.
const RUN_SHELL_SCRIPT: [&str; 2] = ["CustomizeFunction", "TestImageFunction"];

/// The functions the template grants RunInstances (passing the builder role only).
const LAUNCHERS: [&str; 2] = ["LaunchBuilderFunction", "TestImageFunction"];

/// What the test asked and saw, printed as its counts line.
#[derive(Debug, Default)]
struct Tally {
    /// Decisions the evaluator made for the test's requests.
    evaluated: usize,
    refusals: usize,
    controls: usize,
    /// Denials in the decisions of a positive control (must stay 0).
    unexpected_denies: usize,
}

/// A request a role must not make, and the refusal expected: AWS's error code, and the decision
/// that denies it (the first denied IAM request of the call, which ends the evaluation).
struct Forbidden {
    function: &'static str,
    what: String,
    code: &'static str,
    action: &'static str,
    resource: String,
}

impl Forbidden {
    fn ec2(function: &'static str, what: String, action: &'static str, resource: String) -> Self {
        Forbidden {
            function,
            what,
            code: "UnauthorizedOperation",
            action,
            resource,
        }
    }

    fn ssm(function: &'static str, what: String, action: &'static str, resource: String) -> Self {
        Forbidden {
            function,
            what,
            code: "AccessDeniedException",
            action,
            resource,
        }
    }

    fn s3(function: &'static str, what: String, resource: String) -> Self {
        Forbidden {
            function,
            what,
            code: "AccessDenied",
            action: "s3:PutObject",
            resource,
        }
    }
}

/// Sends requests and reads the evaluator's decisions for each (the requests are sent one at a
/// time, without retries, so the lines added to the log while one runs are that request's).
struct Probe<'a> {
    r: &'a Rehearsal,
    rt: &'a tokio::runtime::Runtime,
    tally: Tally,
}

/// The decisions that name an IAM action (not faults or signature refusals).
fn evaluated(lines: &[Json]) -> usize {
    lines.iter().filter(|d| d.get("action").is_some()).count()
}

fn denied(d: &Json) -> bool {
    matches!(
        d["result"].as_str(),
        Some("ImplicitlyDenied" | "ExplicitlyDenied")
    )
}

impl Probe<'_> {
    fn send<T, E>(
        &mut self,
        call: impl Future<Output = Result<T, E>>,
    ) -> (Result<T, E>, Vec<Json>) {
        let mark = self.r.decisions().len();
        let answer = self.rt.block_on(call);
        let lines = self.r.decisions().split_off(mark);
        self.tally.evaluated += evaluated(&lines);
        (answer, lines)
    }

    /// The request is refused with `f.code`, and the last decision made for it is the evaluator's
    /// denial of `f.action` on `f.resource` for `f.function`'s role.
    fn refused<T, E: ProvideErrorMetadata + Debug>(
        &mut self,
        f: Forbidden,
        call: impl Future<Output = Result<T, E>>,
    ) {
        let (answer, lines) = self.send(call);
        let who = format!("{} {}", f.function, f.what);
        let Err(e) = answer else {
            panic!(
                "{who}: expected {} ({} denied on {}), the request succeeded; decisions: {lines:#?}",
                f.code, f.action, f.resource
            );
        };
        assert_eq!(e.code(), Some(f.code), "{who}: AWS's answer {e:?}");
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("{who}: refused ({e:?}) but the evaluator was never asked"));
        assert!(
            denied(last),
            "{who}: the evaluator's last decision is not a denial: {lines:#?}"
        );
        assert!(
            last["role"]
                .as_str()
                .is_some_and(|r| r.contains(&format!("-{}Role-", f.function))),
            "{who}: decided for another role: {last:#}"
        );
        assert_eq!(last["action"], f.action, "{who}: {last:#}");
        assert_eq!(last["resource"], f.resource.as_str(), "{who}: {last:#}");
        self.tally.refusals += 1;
    }

    /// A positive control by one of the stack's roles: it succeeds, every decision made for it is
    /// "Allowed", and there was at least one.
    fn control_by_role<T, E: Debug>(
        &mut self,
        function: &str,
        what: &str,
        call: impl Future<Output = Result<T, E>>,
    ) -> T {
        let (answer, lines) = self.send(call);
        let denies = lines.iter().filter(|d| denied(d)).count();
        self.tally.unexpected_denies += denies;
        let out = answer.unwrap_or_else(|e| {
            panic!("positive control {function} {what} failed: {e:?}; decisions: {lines:#?}")
        });
        assert_eq!(denies, 0, "positive control {function} {what}: {lines:#?}");
        assert!(
            evaluated(&lines) > 0,
            "positive control {function} {what}: the evaluator was never asked"
        );
        self.tally.controls += 1;
        out
    }

    /// A positive control by the account's administrator: the same request on the same resource
    /// succeeds (moto runs it unchecked: it exists and is well formed).
    fn control_by_admin<T, E: Debug>(
        &mut self,
        what: &str,
        call: impl Future<Output = Result<T, E>>,
    ) -> T {
        let (answer, lines) = self.send(call);
        self.tally.unexpected_denies += lines.iter().filter(|d| denied(d)).count();
        let out = answer
            .unwrap_or_else(|e| panic!("positive control by the administrator, {what}: {e:?}"));
        self.tally.controls += 1;
        out
    }
}

/// AWS clients with a deployed function's role credentials (AssumeRole, as Lambda hands them to
/// the bootstrap), one attempt per call.
struct Clients {
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    s3: aws_sdk_s3::Client,
}

impl Clients {
    fn of(config: &aws_config::SdkConfig) -> Clients {
        Clients {
            ec2: aws_sdk_ec2::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(config)
                    .force_path_style(true)
                    .request_checksum_calculation(
                        aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                    )
                    .build(),
            ),
        }
    }

    fn as_function(r: &Rehearsal, rt: &tokio::runtime::Runtime, function: &str) -> Clients {
        Clients::of(&r.as_function(rt, function))
    }
}

fn instance_arn(id: &str) -> String {
    format!("arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{id}")
}

fn image_arn(id: &str) -> String {
    format!("arn:aws:ec2:{REGION}::image/{id}")
}

fn snapshot_arn(id: &str) -> String {
    format!("arn:aws:ec2:{REGION}::snapshot/{id}")
}

fn document_arn(name: &str) -> String {
    format!("arn:aws:ssm:{REGION}:{ACCOUNT}:document/{name}")
}

fn parameter_arn(name: &str) -> String {
    format!(
        "arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/{}",
        name.trim_start_matches('/')
    )
}

/// `kiln:stack = stack` on what a create call makes of `kind`.
fn stack_tag(kind: ResourceType, stack: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .tags(Tag::builder().key("kiln:stack").value(stack).build())
        .build()
}

/// An instance with, when `stack` is given, `kiln:stack = stack` on it and its volume.
async fn launch(
    ec2: &aws_sdk_ec2::Client,
    image: &str,
    stack: Option<&str>,
    profile: Option<&str>,
) -> Result<
    String,
    aws_sdk_ec2::error::SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError>,
> {
    let mut run = ec2
        .run_instances()
        .image_id(image)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1);
    if let Some(stack) = stack {
        run = run
            .tag_specifications(stack_tag(ResourceType::Instance, stack))
            .tag_specifications(stack_tag(ResourceType::Volume, stack));
    }
    if let Some(profile) = profile {
        run = run.iam_instance_profile(
            IamInstanceProfileSpecification::builder()
                .name(profile)
                .build(),
        );
    }
    let out = run.send().await?;
    Ok(out.instances()[0]
        .instance_id()
        .expect("an instance id")
        .to_string())
}

/// An image of `instance` (tagged `kiln:stack = stack`, image and snapshot, when given), and its
/// snapshot.
async fn image_of(
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
    name: &str,
    stack: Option<&str>,
) -> Result<
    (String, String),
    aws_sdk_ec2::error::SdkError<aws_sdk_ec2::operation::create_image::CreateImageError>,
> {
    let mut create = ec2.create_image().instance_id(instance).name(name);
    if let Some(stack) = stack {
        create = create
            .tag_specifications(stack_tag(ResourceType::Image, stack))
            .tag_specifications(stack_tag(ResourceType::Snapshot, stack));
    }
    let image = create
        .send()
        .await?
        .image_id()
        .expect("an image id")
        .to_string();
    let described = ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .expect("DescribeImages");
    let snapshot = described.images()[0].block_device_mappings()[0]
        .ebs()
        .and_then(|e| e.snapshot_id())
        .expect("the image's snapshot")
        .to_string();
    Ok((image, snapshot))
}

/// An instance, its image and the image's snapshot that the stack did not make.
struct NotTheStacks {
    whose: &'static str,
    instance: String,
    image: String,
    snapshot: String,
}

fn share(account: &str) -> LaunchPermissionModifications {
    LaunchPermissionModifications::builder()
        .add(LaunchPermission::builder().user_id(account).build())
        .build()
}

fn retag() -> Tag {
    Tag::builder().key("kiln:stack").value(STACK).build()
}

#[test]
fn no_function_of_the_deployed_stack_may_touch_what_the_stack_did_not_make() {
    let started = std::time::Instant::now();
    // GIVEN the stack deployed into moto, every function's role in force
    let r = Rehearsal::deploy();
    let rt = runtime();
    let admin = r.admin(&rt);
    let a = Clients::of(&admin);
    let mut p = Probe {
        r: &r,
        rt: &rt,
        tally: Tally::default(),
    };
    let parent = rt
        .block_on(a.ec2.describe_images().owners("amazon").send())
        .expect("DescribeImages")
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .min()
        .expect("moto's Amazon images");
    // AND, made by the account's administrator, an instance, image and snapshot without the
    // stack's tag, and another set carrying a forged `kiln:stack` of another stack's name
    let mut outside = Vec::new();
    for (whose, stack) in [
        ("the administrator's untagged", None),
        (
            "another stack's (kiln:stack=kiln-other)",
            Some("kiln-other"),
        ),
    ] {
        let instance = rt
            .block_on(launch(&a.ec2, &parent, stack, None))
            .expect("RunInstances");
        let (image, snapshot) = rt
            .block_on(image_of(
                &a.ec2,
                &instance,
                &format!("not-kiln-{}", outside.len()),
                stack,
            ))
            .expect("CreateImage");
        outside.push(NotTheStacks {
            whose,
            instance,
            image,
            snapshot,
        });
    }
    // AND a launch template, a SecureString parameter no pipeline names, a bucket of their own,
    // and instance profiles of roles that are not the builder's
    let template = rt
        .block_on(
            a.ec2
                .create_launch_template()
                .launch_template_name("someone-elses-template")
                .launch_template_data(
                    RequestLaunchTemplateData::builder()
                        .image_id(&parent)
                        .build(),
                )
                .send(),
        )
        .expect("CreateLaunchTemplate")
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .expect("an id")
        .to_string();
    let secret = "/prod/db/password";
    rt.block_on(
        a.ssm
            .put_parameter()
            .name(secret)
            .value("hunter2")
            .r#type(ParameterType::SecureString)
            .send(),
    )
    .expect("PutParameter");
    let other_bucket = "someone-elses-bucket";
    rt.block_on(a.s3.create_bucket().bucket(other_bucket).send())
        .expect("CreateBucket");
    let profiles: Json = {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/rehearsal/outsider_profiles.py"))
            .arg(&r.outputs["SchedulerRoleArn"])
            .envs(r.moto.env());
        serde_json::from_str(&run_ok(cmd)).expect("outsider_profiles.py prints JSON")
    };
    let bucket = r.outputs["ArtifactsBucketName"].clone();
    let builder_profile = r.outputs["BuilderInstanceProfileName"].clone();
    // AND the stack's own instances, launched by its launching roles with the builder's profile
    // (the positive control of each refused PassRole)
    let mut ours = Vec::new();
    for function in LAUNCHERS {
        let c = Clients::as_function(&r, &rt, function);
        ours.push(p.control_by_role(
            function,
            "RunInstances tagged kiln:stack with the builder's instance profile",
            launch(&c.ec2, &parent, Some(STACK), Some(&builder_profile)),
        ));
    }
    let ours_first = ours[0].clone();

    // WHEN each function's role asks for what it must not do
    // THEN each request is refused with AWS's error code and the evaluator's denial
    for function in FUNCTIONS {
        let c = Clients::as_function(&r, &rt, function);
        for o in &outside {
            let instance = instance_arn(&o.instance);
            p.refused(
                Forbidden::ec2(
                    function,
                    format!("TerminateInstances of {} instance", o.whose),
                    "ec2:TerminateInstances",
                    instance.clone(),
                ),
                c.ec2.terminate_instances().instance_ids(&o.instance).send(),
            );
            p.refused(
                Forbidden::ec2(
                    function,
                    format!("StopInstances of {} instance", o.whose),
                    "ec2:StopInstances",
                    instance.clone(),
                ),
                c.ec2.stop_instances().instance_ids(&o.instance).send(),
            );
            p.refused(
                Forbidden::ec2(
                    function,
                    format!("DeregisterImage of {} image", o.whose),
                    "ec2:DeregisterImage",
                    image_arn(&o.image),
                ),
                c.ec2.deregister_image().image_id(&o.image).send(),
            );
            p.refused(
                Forbidden::ec2(
                    function,
                    format!("DeleteSnapshot of {} snapshot", o.whose),
                    "ec2:DeleteSnapshot",
                    snapshot_arn(&o.snapshot),
                ),
                c.ec2.delete_snapshot().snapshot_id(&o.snapshot).send(),
            );
            p.refused(
                Forbidden::ec2(
                    function,
                    format!("ModifyImageAttribute (share) of {} image", o.whose),
                    "ec2:ModifyImageAttribute",
                    image_arn(&o.image),
                ),
                c.ec2
                    .modify_image_attribute()
                    .image_id(&o.image)
                    .launch_permission(share("111122223333"))
                    .send(),
            );
            // A re-tag would make the resource the stack's for every tag condition.
            for (kind, id, arn) in [
                ("instance", &o.instance, instance.clone()),
                ("image", &o.image, image_arn(&o.image)),
                ("snapshot", &o.snapshot, snapshot_arn(&o.snapshot)),
            ] {
                p.refused(
                    Forbidden::ec2(
                        function,
                        format!("CreateTags kiln:stack={STACK} on {} {kind}", o.whose),
                        "ec2:CreateTags",
                        arn,
                    ),
                    c.ec2.create_tags().resources(id).tags(retag()).send(),
                );
            }
            let on = if RUN_SHELL_SCRIPT.contains(&function) {
                instance.clone()
            } else {
                document_arn("AWS-RunShellScript")
            };
            p.refused(
                Forbidden::ssm(
                    function,
                    format!("SendCommand AWS-RunShellScript to {} instance", o.whose),
                    "ssm:SendCommand",
                    on,
                ),
                c.ssm
                    .send_command()
                    .document_name("AWS-RunShellScript")
                    .instance_ids(&o.instance)
                    .parameters("commands", vec!["id".to_string()])
                    .send(),
            );
        }
        // Another document, to the stack's own instance.
        p.refused(
            Forbidden::ssm(
                function,
                "SendCommand AWS-RunPowerShellScript to the stack's instance".into(),
                "ssm:SendCommand",
                document_arn("AWS-RunPowerShellScript"),
            ),
            c.ssm
                .send_command()
                .document_name("AWS-RunPowerShellScript")
                .instance_ids(&ours_first)
                .parameters("commands", vec!["whoami".to_string()])
                .send(),
        );
        // PassRole of any role but the builder's.
        if LAUNCHERS.contains(&function) {
            for key in ["outsider", "scheduler"] {
                let profile = profiles[key]["profile"].as_str().expect("profile");
                p.refused(
                    Forbidden::ec2(
                        function,
                        format!("RunInstances (tagged kiln:stack) with instance profile {profile}"),
                        "iam:PassRole",
                        profiles[key]["role"].as_str().expect("role").to_string(),
                    ),
                    launch(&c.ec2, &parent, Some(STACK), Some(profile)),
                );
            }
        }
        // S3 writes outside the builds' prefix: `agent/` (make deploy's), elsewhere in the
        // artifacts bucket, another bucket.
        for (b, key) in [
            (
                bucket.as_str(),
                format!("agent/kiln-agent-{}", std::env::consts::ARCH),
            ),
            (bucket.as_str(), "elsewhere/report.json".to_string()),
            (
                other_bucket,
                "builds/01JBREFUSED/customize/report.json".to_string(),
            ),
        ] {
            p.refused(
                Forbidden::s3(
                    function,
                    format!("PutObject s3://{b}/{key}"),
                    format!("arn:aws:s3:::{b}/{key}"),
                ),
                c.s3.put_object()
                    .bucket(b)
                    .key(&key)
                    .body(aws_sdk_s3::primitives::ByteStream::from_static(
                        b"not the stack's",
                    ))
                    .send(),
            );
        }
        // Parameters the stack does not publish or read.
        let put = Forbidden::ssm(
            function,
            "PutParameter /prod/app/ami (outside what the stack publishes)".into(),
            "ssm:PutParameter",
            parameter_arn("/prod/app/ami"),
        );
        let put_call = c
            .ssm
            .put_parameter()
            .name("/prod/app/ami")
            .value("ami-12345678")
            .r#type(ParameterType::String)
            .overwrite(true)
            .send();
        // PutParameter only under the stack's ImageParameterPrefix (security review M-4).
        p.refused(put, put_call);
        let get = Forbidden::ssm(
            function,
            format!("GetParameter {secret} (no pipeline names it)"),
            "ssm:GetParameter",
            parameter_arn(secret),
        );
        let get_call = c
            .ssm
            .get_parameter()
            .name(secret)
            .with_decryption(true)
            .send();
        // Parent parameters only under `/aws/service/` and the stack's ImageParameterPrefix
        // (security review M-4, L4).
        p.refused(get, get_call);
        let version = Forbidden::ec2(
            function,
            "CreateLaunchTemplateVersion of someone else's launch template".into(),
            "ec2:CreateLaunchTemplateVersion",
            format!("arn:aws:ec2:{REGION}:{ACCOUNT}:launch-template/{template}"),
        );
        let version_call = c
            .ec2
            .create_launch_template_version()
            .launch_template_id(&template)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(&parent)
                    .build(),
            )
            .send();
        // Only launch templates the user tagged kiln:stack=<stack> (security review M-4).
        p.refused(version, version_call);
    }

    // THEN the roles may do each of those on what the stack made (positive controls): the
    // refusals above came from the conditions, not from a missing grant
    for (function, instance) in RUN_SHELL_SCRIPT.iter().zip(&ours) {
        let c = Clients::as_function(&r, &rt, function);
        p.control_by_role(
            function,
            "SendCommand AWS-RunShellScript to the stack's instance",
            c.ssm
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(instance)
                .parameters("commands", vec!["id".to_string()])
                .send(),
        );
    }
    for function in RUN_SHELL_SCRIPT {
        let c = Clients::as_function(&r, &rt, function);
        p.control_by_role(
            function,
            "PutObject under builds/",
            c.s3.put_object()
                .bucket(&bucket)
                .key("builds/01JBALLOWED/customize/report.json")
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"{}"))
                .send(),
        );
    }
    let snapshotter = Clients::as_function(&r, &rt, "SnapshotFunction");
    p.control_by_role(
        "SnapshotFunction",
        "StopInstances of the stack's instance",
        snapshotter
            .ec2
            .stop_instances()
            .instance_ids(&ours_first)
            .send(),
    );
    let (our_image, our_snapshot) = p.control_by_role(
        "SnapshotFunction",
        "CreateImage of the stack's instance, tagged kiln:stack",
        image_of(&snapshotter.ec2, &ours_first, "kiln-refusals", Some(STACK)),
    );
    let distributor = Clients::as_function(&r, &rt, "DistributeFunction");
    p.control_by_role(
        "DistributeFunction",
        "ModifyImageAttribute (share) of the stack's image",
        distributor
            .ec2
            .modify_image_attribute()
            .image_id(&our_image)
            .launch_permission(share("111122223333"))
            .send(),
    );
    let cleaner = Clients::as_function(&r, &rt, "CleanupFunction");
    p.control_by_role(
        "CleanupFunction",
        "DeregisterImage of the stack's image",
        cleaner.ec2.deregister_image().image_id(&our_image).send(),
    );
    p.control_by_role(
        "CleanupFunction",
        "DeleteSnapshot of the stack's snapshot",
        cleaner
            .ec2
            .delete_snapshot()
            .snapshot_id(&our_snapshot)
            .send(),
    );
    p.control_by_role(
        "CleanupFunction",
        "TerminateInstances of the stack's instances",
        cleaner
            .ec2
            .terminate_instances()
            .set_instance_ids(Some(ours.clone()))
            .send(),
    );

    // AND what the scoped grants leave: Distribute publishes under the stack's parameter prefix
    // and changes a launch template designated for the stack (tagged kiln:stack); LaunchBuilder
    // and Trigger read a parent under the prefix and AWS's public ones
    let ours_template = rt
        .block_on(
            a.ec2
                .create_launch_template()
                .launch_template_name("designated-for-the-stack")
                .launch_template_data(
                    RequestLaunchTemplateData::builder()
                        .image_id(&parent)
                        .build(),
                )
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::LaunchTemplate)
                        .tags(Tag::builder().key("kiln:stack").value(STACK).build())
                        .build(),
                )
                .send(),
        )
        .expect("CreateLaunchTemplate")
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .expect("an id")
        .to_string();
    p.control_by_role(
        "DistributeFunction",
        "CreateLaunchTemplateVersion of a launch template tagged kiln:stack",
        distributor
            .ec2
            .create_launch_template_version()
            .launch_template_id(&ours_template)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(&parent)
                    .build(),
            )
            .send(),
    );
    p.control_by_role(
        "DistributeFunction",
        "PutParameter under the stack's parameter prefix",
        distributor
            .ssm
            .put_parameter()
            .name("/images/refusals/latest")
            .value(&parent)
            .r#type(ParameterType::String)
            .overwrite(true)
            .send(),
    );
    for function in ["LaunchBuilderFunction", "TriggerFunction"] {
        let c = Clients::as_function(&r, &rt, function);
        for name in [
            "/images/refusals/latest",
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        ] {
            p.control_by_role(
                function,
                &format!("GetParameter {name}"),
                c.ssm.get_parameter().name(name).send(),
            );
        }
    }

    // AND the administrator's same requests on the same resources succeed (the destructive
    // ones last)
    p.control_by_admin(
        "SendCommand AWS-RunPowerShellScript to the stack's instance",
        a.ssm
            .send_command()
            .document_name("AWS-RunPowerShellScript")
            .instance_ids(&ours_first)
            .parameters("commands", vec!["whoami".to_string()])
            .send(),
    );
    for key in ["outsider", "scheduler"] {
        let profile = profiles[key]["profile"].as_str().expect("profile");
        p.control_by_admin(
            &format!("RunInstances with instance profile {profile}"),
            launch(&a.ec2, &parent, Some(STACK), Some(profile)),
        );
    }
    for (b, key) in [
        (
            bucket.as_str(),
            format!("agent/kiln-agent-{}", std::env::consts::ARCH),
        ),
        (bucket.as_str(), "elsewhere/report.json".to_string()),
        (
            other_bucket,
            "builds/01JBREFUSED/customize/report.json".to_string(),
        ),
    ] {
        // The agent's bytes are put back as they were: no build follows, but the object
        // stays what `make deploy` uploaded.
        let body = rt
            .block_on(async {
                let got = a.s3.get_object().bucket(b).key(&key).send().await.ok()?;
                Some(got.body.collect().await.ok()?.into_bytes().to_vec())
            })
            .unwrap_or_else(|| b"not the stack's".to_vec());
        p.control_by_admin(
            &format!("PutObject s3://{b}/{key}"),
            a.s3.put_object()
                .bucket(b)
                .key(&key)
                .body(body.into())
                .send(),
        );
    }
    p.control_by_admin(
        "PutParameter /prod/app/ami",
        a.ssm
            .put_parameter()
            .name("/prod/app/ami")
            .value("ami-12345678")
            .r#type(ParameterType::String)
            .overwrite(true)
            .send(),
    );
    p.control_by_admin(
        &format!("GetParameter {secret}"),
        a.ssm
            .get_parameter()
            .name(secret)
            .with_decryption(true)
            .send(),
    );
    p.control_by_admin(
        "CreateLaunchTemplateVersion of someone else's launch template",
        a.ec2
            .create_launch_template_version()
            .launch_template_id(&template)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(&parent)
                    .build(),
            )
            .send(),
    );
    for o in &outside {
        p.control_by_admin(
            &format!("SendCommand AWS-RunShellScript to {} instance", o.whose),
            a.ssm
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(&o.instance)
                .parameters("commands", vec!["id".to_string()])
                .send(),
        );
        p.control_by_admin(
            &format!("ModifyImageAttribute (share) of {} image", o.whose),
            a.ec2
                .modify_image_attribute()
                .image_id(&o.image)
                .launch_permission(share("111122223333"))
                .send(),
        );
        for (kind, id) in [
            ("instance", &o.instance),
            ("image", &o.image),
            ("snapshot", &o.snapshot),
        ] {
            p.control_by_admin(
                &format!("CreateTags kiln:stack={STACK} on {} {kind}", o.whose),
                a.ec2.create_tags().resources(id).tags(retag()).send(),
            );
        }
        p.control_by_admin(
            &format!("StopInstances of {} instance", o.whose),
            a.ec2.stop_instances().instance_ids(&o.instance).send(),
        );
        p.control_by_admin(
            &format!("TerminateInstances of {} instance", o.whose),
            a.ec2.terminate_instances().instance_ids(&o.instance).send(),
        );
        // The image first: AWS (and moto) refuse to delete a registered image's snapshot.
        p.control_by_admin(
            &format!("DeregisterImage of {} image", o.whose),
            a.ec2.deregister_image().image_id(&o.image).send(),
        );
        p.control_by_admin(
            &format!("DeleteSnapshot of {} snapshot", o.whose),
            a.ec2.delete_snapshot().snapshot_id(&o.snapshot).send(),
        );
    }

    let t = &p.tally;
    eprintln!(
        "refusals: requests evaluated {}, refusals asserted {}, positive controls {}, denies where none was expected {}, in {:.1}s",
        t.evaluated,
        t.refusals,
        t.controls,
        t.unexpected_denies,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(t.unexpected_denies, 0, "denied in a positive control");
    // Every function was refused something, and the matrix is complete: a case lost to an edit
    // would otherwise go unnoticed.
    assert_eq!(
        t.refusals,
        FUNCTIONS.len() * 25 + LAUNCHERS.len() * 2,
        "{t:?}"
    );
}
