//! Issue 28 items 6 and 7 (test review F7, F8): the rehearsal's server is as strict as AWS about
//! who signed a request, and kiln-agent's own SigV4 is verified by it on real calls.
//!
//! - The agent signs its S3 and SSM calls itself (agent/src/s3.rs `sign`, agent/src/secrets.rs).
//!   On EC2 it always holds an instance role's temporary credentials, so every call carries a
//!   session token. Here the real `kiln-agent` binary runs S3Download, S3Upload and an
//!   `ssm-secure` parameter with credentials of a role assumed through moto's STS, against the
//!   authorizing server, which verifies the signature and the token before it evaluates the
//!   role's policy; the same calls with the token dropped, another token, or the secret altered
//!   are refused with AWS's codes.
//! - Requests nobody can be held to are refused before any policy is read: unsigned ones, keys
//!   that are neither an assumed role's nor the administrator's, temporary keys without their
//!   session token. Requests the mapping to IAM does not know are refused (`Unmapped`) and fail
//!   any rehearsal test that asserts all was allowed. RunInstances is evaluated on the real
//!   subnet, security group, key pair and launch template.
//!
//! Every refusal has its positive control: the same request signed properly, or by the
//! administrator, succeeds.

// The closures under test return the SDK's own results (large errors), which the tests inspect.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::process::Command;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, InstanceType, LaunchTemplateSpecification,
    RequestLaunchTemplateData, ResourceType, Tag, TagSpecification,
};
use serde_json::{json, Value as Json};

use crate::agent::{run_doc_env, Run};
use crate::rehearsal::{python, raw_http, runtime, Rehearsal, STACK};
use crate::support::{repo, run_ok, Moto};

const REGION: &str = "us-east-1";
const ACCOUNT: &str = "123456789012";

/// AWS clients against the rehearsal's server with any credentials, no retries.
struct Clients {
    s3: aws_sdk_s3::Client,
    ssm: aws_sdk_ssm::Client,
    ec2: aws_sdk_ec2::Client,
    dynamodb: aws_sdk_dynamodb::Client,
}

impl Clients {
    /// Over TLS, as the functions reach AWS (the bucket's policy refuses anything else).
    fn new(
        rt: &tokio::runtime::Runtime,
        moto: &Moto,
        key: &str,
        secret: &str,
        token: Option<&str>,
    ) -> Clients {
        let config = rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(REGION))
                .endpoint_url(moto.tls_endpoint())
                .http_client(moto.https_client())
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                    key,
                    secret,
                    token.map(str::to_string),
                    None,
                    "probe",
                ))
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .load(),
        );
        Clients::of(&config)
    }

    fn of(config: &aws_config::SdkConfig) -> Clients {
        Clients {
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(config)
                    .force_path_style(true)
                    .build(),
            ),
            ssm: aws_sdk_ssm::Client::new(config),
            ec2: aws_sdk_ec2::Client::new(config),
            dynamodb: aws_sdk_dynamodb::Client::new(config),
        }
    }
}

/// The decisions the server recorded while `f` ran.
fn decided<T>(log: &dyn Fn() -> Vec<Json>, f: impl FnOnce() -> T) -> (T, Vec<Json>) {
    let mark = log().len();
    let out = f();
    (out, log().split_off(mark))
}

fn read_log(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The request was refused with `code`, and the server's last line says why it refused to
/// attribute it (`result`: CredentialsRefused or SignatureRefused).
fn assert_refused<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug>(
    what: &str,
    (answer, lines): (Result<T, E>, Vec<Json>),
    code: &str,
    result: &str,
    why: &str,
) {
    let e = match answer {
        Ok(v) => panic!("{what}: expected {code}, it succeeded: {v:?}; {lines:#?}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Some(code), "{what}: {e:?}");
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("{what}: refused ({code}) but the server recorded nothing"));
    assert_eq!(last["result"], result, "{what}: {last:#}");
    assert_eq!(last["code"], code, "{what}: {last:#}");
    assert!(
        last["why"].as_str().is_some_and(|w| w.contains(why)),
        "{what}: {last:#}"
    );
    assert!(
        lines.iter().all(|d| d.get("action").is_none()),
        "{what}: a policy was evaluated for a request nobody signed for: {lines:#?}"
    );
}

/// A positive control: the request succeeds and nothing was refused on its way.
fn assert_control<T, E: std::fmt::Debug>(
    what: &str,
    (answer, lines): (Result<T, E>, Vec<Json>),
) -> T {
    let out = answer.unwrap_or_else(|e| panic!("positive control {what}: {e:?}; {lines:#?}"));
    assert!(
        lines.iter().all(|d| d["result"] == "Allowed"),
        "positive control {what}: {lines:#?}"
    );
    out
}

/// A role made by the administrator with `policy`, assumed through moto's STS:
/// (access key, secret, session token).
fn assumed(moto: &Moto, name: &str, policy: &Json) -> (String, String, String) {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/rehearsal/roles.py"))
        .args(["assume", name, &policy.to_string()])
        .envs(moto.env());
    let creds: Json = serde_json::from_str(&run_ok(cmd)).expect("roles.py prints JSON");
    let field = |k: &str| creds[k].as_str().expect(k).to_string();
    assert!(
        field("AccessKeyId").starts_with("ASIA"),
        "temporary credentials: {creds}"
    );
    (
        field("AccessKeyId"),
        field("SecretAccessKey"),
        field("SessionToken"),
    )
}

const PROBE_BUCKET: &str = "kiln-agent-probe";
const SECRET: &str = "kiln-probe-secret-5e1d";

/// The agent's environment: the role's credentials (`token` None drops the session token),
/// the server's plain endpoint (the agent's TLS trusts the public roots only).
fn agent_env(
    moto: &Moto,
    key: &str,
    secret: &str,
    token: Option<&str>,
) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", moto.endpoint()),
        ("AWS_ACCESS_KEY_ID", key.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
        // Empty is unset for the agent (and overrides whatever the test runner has).
        ("AWS_SESSION_TOKEN", token.unwrap_or_default().to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
}

/// S3Download of the probe object and S3Upload of it to `out/<name>.txt`, each step run even
/// when the other fails.
fn s3_run(env: &[(&str, String)], name: &str) -> Run {
    let doc = format!(
        "name: t\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Download\n        action: S3Download\n        onFailure: Continue\n        inputs:\n          - source: s3://{PROBE_BUCKET}/in/data.txt\n            destination: \"@DIR@/got.txt\"\n      - name: Upload\n        action: S3Upload\n        onFailure: Continue\n        inputs:\n          - source: \"@DIR@/up.txt\"\n            destination: s3://{PROBE_BUCKET}/out/{name}.txt\n      - name: Prepare\n        action: ExecuteBash\n        inputs:\n          commands:\n            - 'true'\n"
    );
    // The upload's source exists before the run (the download may be the step that fails).
    let dir = tempfile::tempdir().expect("dir");
    let up = dir.path().join("up.txt");
    std::fs::write(&up, format!("uploaded by {name}")).expect("up");
    run_doc_env(
        &doc.replace("@DIR@/up.txt", &up.display().to_string()),
        &[],
        env,
    )
}

/// A run whose component parameter is `{{ ssm-secure:/probe/secret }}`, written to used.txt.
fn ssm_run(env: &[(&str, String)]) -> Run {
    let dir = tempfile::tempdir().expect("dir");
    let params = dir.path().join("params.json");
    std::fs::write(&params, r#"[{"Secret": "{{ ssm-secure:/probe/secret }}"}]"#).expect("params");
    let doc = "name: t\nschemaVersion: 1.0\nparameters:\n  - Secret:\n      type: string\nphases:\n  - name: build\n    steps:\n      - name: Use\n        action: ExecuteBash\n        inputs:\n          commands:\n            - printf '%s' '{{ Secret }}' > @DIR@/used.txt\n";
    run_doc_env(
        doc,
        &["--parameters-file", &params.display().to_string()],
        env,
    )
}

#[test]
fn the_agents_own_sigv4_with_a_session_token_is_verified_and_a_wrong_one_refused() {
    // GIVEN the rehearsal's authorizing server, a bucket with an object and a SecureString made
    // by the administrator, and a role allowed to read and write them, assumed through STS
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("authz.jsonl");
    let answers = dir.path().join("answers.jsonl");
    std::fs::write(&answers, "").expect("answers");
    let moto = Moto::start_authorizing(&log, &dir.path().join("faults.json"), &answers);
    let rt = runtime();
    let admin = Clients::of(
        &rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(REGION))
                .endpoint_url(moto.endpoint())
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                    "testing", "testing", None, None, "admin",
                ))
                .load(),
        ),
    );
    rt.block_on(admin.s3.create_bucket().bucket(PROBE_BUCKET).send())
        .expect("CreateBucket");
    rt.block_on(
        admin
            .s3
            .put_object()
            .bucket(PROBE_BUCKET)
            .key("in/data.txt")
            .body(b"probe data".to_vec().into())
            .send(),
    )
    .expect("PutObject");
    rt.block_on(
        admin
            .ssm
            .put_parameter()
            .name("/probe/secret")
            .value(SECRET)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send(),
    )
    .expect("PutParameter");
    let (key, secret, token) = assumed(
        &moto,
        "kiln-agent-probe",
        &json!({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": format!("arn:aws:s3:::{PROBE_BUCKET}/*")},
                {"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": format!("arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/probe/*")}
            ]
        }),
    );
    let log_of = || read_log(&log);
    let object = |k: &str| format!("arn:aws:s3:::{PROBE_BUCKET}/{k}");
    let parameter = format!("arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/probe/secret");
    let allowed = |lines: &[Json], action: &str, resource: &str| {
        lines.iter().any(|d| {
            d["role"] == "kiln-agent-probe"
                && d["action"] == action
                && d["resource"] == resource
                && d["result"] == "Allowed"
        })
    };

    // WHEN the agent downloads, uploads and reads the SecureString with the role's credentials
    let good = agent_env(&moto, &key, &secret, Some(&token));
    let (run, lines) = decided(&log_of, || s3_run(&good, "good"));
    // THEN each call's signature and token were verified and the role's policy allowed it
    assert_eq!(
        run.step("Download").0,
        "success",
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.step("Upload").0,
        "success",
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.read("got.txt"), "probe data");
    assert!(
        allowed(&lines, "s3:GetObject", &object("in/data.txt")),
        "{lines:#?}"
    );
    assert!(
        allowed(&lines, "s3:PutObject", &object("out/good.txt")),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|d| d["result"] == "Allowed"), "{lines:#?}");
    let (run, lines) = decided(&log_of, || ssm_run(&good));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.read("used.txt"), SECRET);
    assert!(
        allowed(&lines, "ssm:GetParameter", &parameter),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|d| d["result"] == "Allowed"), "{lines:#?}");

    // WHEN the same calls are signed without the session token, with another token, or with
    // another secret
    let wrong_token = format!("{}x", &token[..token.len() - 1]);
    for (name, env, s3_code, ssm_code, result, why) in [
        (
            "no-token",
            agent_env(&moto, &key, &secret, None),
            "HTTP 403 InvalidAccessKeyId",
            "HTTP 400 UnrecognizedClientException",
            "CredentialsRefused",
            "no session token",
        ),
        (
            "other-token",
            agent_env(&moto, &key, &secret, Some(&wrong_token)),
            "HTTP 400 InvalidToken",
            "HTTP 400 UnrecognizedClientException",
            "CredentialsRefused",
            "another session token",
        ),
        (
            "other-secret",
            agent_env(&moto, &key, &format!("{secret}x"), Some(&token)),
            "HTTP 403 SignatureDoesNotMatch",
            "HTTP 400 InvalidSignatureException",
            "SignatureRefused",
            "does not match",
        ),
    ] {
        let (run, lines) = decided(&log_of, || s3_run(&env, name));
        // THEN each is refused with AWS's code, before any policy is evaluated, and the upload
        // never reached the bucket
        assert_eq!(run.step("Download").0, "failed", "{name}: {}", run.stdout);
        assert_eq!(run.step("Upload").0, "failed", "{name}: {}", run.stdout);
        assert!(run.stdout.contains(s3_code), "{name}: {}", run.stdout);
        assert_eq!(lines.len(), 2, "{name}: {lines:#?}");
        for d in &lines {
            assert!(
                d["result"] == result
                    && d["role"] == "kiln-agent-probe"
                    && d["why"].as_str().is_some_and(|w| w.contains(why)),
                "{name}: {d:#}"
            );
        }
        let stored = rt.block_on(
            admin
                .s3
                .head_object()
                .bucket(PROBE_BUCKET)
                .key(format!("out/{name}.txt"))
                .send(),
        );
        assert!(stored.is_err(), "{name}: the refused upload was stored");
        let (run, lines) = decided(&log_of, || ssm_run(&env));
        assert_eq!(run.code, 1, "{name}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr
                .contains(&format!("SSM GetParameter /probe/secret: {ssm_code}")),
            "{name}: {}",
            run.stderr
        );
        assert!(
            lines.len() == 1 && lines[0]["result"] == result,
            "{name}: {lines:#?}"
        );
    }
}

/// An instance launched as the launch function launches one (tagged with the stack, the
/// builder's profile), with a key pair and, when given, a launch template.
async fn launch(
    ec2: &aws_sdk_ec2::Client,
    image: &str,
    profile: &str,
    key_pair: &str,
    template: Option<&str>,
) -> Result<
    String,
    aws_sdk_ec2::error::SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError>,
> {
    let tag = |kind| {
        TagSpecification::builder()
            .resource_type(kind)
            .tags(Tag::builder().key("kiln:stack").value(STACK).build())
            .build()
    };
    let mut run = ec2
        .run_instances()
        .image_id(image)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .key_name(key_pair)
        .tag_specifications(tag(ResourceType::Instance))
        .tag_specifications(tag(ResourceType::Volume))
        .iam_instance_profile(
            IamInstanceProfileSpecification::builder()
                .name(profile)
                .build(),
        );
    if let Some(t) = template {
        run = run.launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_id(t)
                .build(),
        );
    }
    let out = run.send().await?;
    Ok(out.instances()[0]
        .instance_id()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn requests_nobody_can_be_held_to_or_that_the_mapping_does_not_know_are_refused() {
    // GIVEN the deployed stack, its artifacts bucket holding the agent, its table, and the
    // customize function's credentials as Lambda hands them over
    let r = Rehearsal::deploy();
    let rt = runtime();
    let bucket = r.outputs["ArtifactsBucketName"].clone();
    let table = r.outputs["TableName"].clone();
    let agent = format!("agent/kiln-agent-{}", std::env::consts::ARCH);
    let admin = Clients::of(&r.admin(&rt));
    let f = r.function("CustomizeFunction");
    let env = |k: &str| {
        f.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k}"))
    };
    let (key, secret, token) = (
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_SECRET_ACCESS_KEY"),
        env("AWS_SESSION_TOKEN"),
    );
    let role = Clients::new(&rt, &r.moto, &key, &secret, Some(&token));
    let log = || r.decisions();
    let get_agent = |c: &Clients| c.s3.get_object().bucket(&bucket).key(&agent).send();
    let get_item = |c: &Clients| {
        c.dynamodb
            .get_item()
            .table_name(&table)
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S("PIPELINE#none".into()),
            )
            .key(
                "sk",
                aws_sdk_dynamodb::types::AttributeValue::S("LOCK".into()),
            )
            .send()
    };

    // WHEN the agent is read without a signature (as an anonymous curl would)
    let url = format!("{}/{bucket}/{agent}", r.moto.tls_endpoint());
    let ((status, answer), lines) = decided(&log, || raw_http(&r, "GET", &url, b""));
    // THEN S3 refuses it as it refuses anonymous access to a private bucket
    assert!(
        status == 403 && answer.contains("<Code>AccessDenied</Code>"),
        "{status} {answer}"
    );
    assert!(
        lines.len() == 1
            && lines[0]["result"] == "CredentialsRefused"
            && lines[0]["why"] == "unsigned",
        "{lines:#?}"
    );
    // AND the same read signed by the role, and by the administrator, succeeds
    assert_control(
        "GetObject agent/* as the role",
        decided(&log, || rt.block_on(get_agent(&role))),
    );
    assert_control(
        "GetObject agent/* as the administrator",
        decided(&log, || rt.block_on(get_agent(&admin))),
    );

    // WHEN a key neither the administrator's nor an assumed role's signs the stack's calls
    let unknown = Clients::new(
        &rt,
        &r.moto,
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    );
    // THEN each service answers as it answers an unknown key
    assert_refused(
        "unknown key S3",
        decided(&log, || rt.block_on(get_agent(&unknown))),
        "InvalidAccessKeyId",
        "CredentialsRefused",
        "unknown key",
    );
    assert_refused(
        "unknown key DynamoDB",
        decided(&log, || rt.block_on(get_item(&unknown))),
        "UnrecognizedClientException",
        "CredentialsRefused",
        "unknown key",
    );
    assert_refused(
        "unknown key EC2",
        decided(&log, || {
            rt.block_on(unknown.ec2.describe_instances().send())
        }),
        "AuthFailure",
        "CredentialsRefused",
        "unknown key",
    );
    assert_refused(
        "unknown key SSM",
        decided(&log, || rt.block_on(unknown.ssm.list_commands().send())),
        "UnrecognizedClientException",
        "CredentialsRefused",
        "unknown key",
    );
    // AND the same calls by the administrator succeed
    assert_control(
        "GetItem as the administrator",
        decided(&log, || rt.block_on(get_item(&admin))),
    );
    assert_control(
        "DescribeInstances as the administrator",
        decided(&log, || rt.block_on(admin.ec2.describe_instances().send())),
    );
    assert_control(
        "ListCommands as the administrator",
        decided(&log, || rt.block_on(admin.ssm.list_commands().send())),
    );

    // WHEN the role's temporary key is used without its session token, or with another's
    let tokenless = Clients::new(&rt, &r.moto, &key, &secret, None);
    assert_refused(
        "no token S3",
        decided(&log, || rt.block_on(get_agent(&tokenless))),
        "InvalidAccessKeyId",
        "CredentialsRefused",
        "no session token",
    );
    assert_refused(
        "no token DynamoDB",
        decided(&log, || rt.block_on(get_item(&tokenless))),
        "UnrecognizedClientException",
        "CredentialsRefused",
        "no session token",
    );
    let other = r.function("CleanupFunction");
    let other_token = other
        .env
        .iter()
        .find(|(n, _)| n == "AWS_SESSION_TOKEN")
        .map(|(_, v)| v.clone())
        .expect("a token");
    let mixed = Clients::new(&rt, &r.moto, &key, &secret, Some(&other_token));
    assert_refused(
        "another token S3",
        decided(&log, || rt.block_on(get_agent(&mixed))),
        "InvalidToken",
        "CredentialsRefused",
        "another session token",
    );
    // AND with its token the role's same calls succeed, evaluated and allowed
    let (item, lines) = decided(&log, || rt.block_on(get_item(&role)));
    assert_control("GetItem as the role", (item, lines.clone()));
    assert!(
        lines.iter().any(|d| d["action"] == "dynamodb:GetItem"),
        "{lines:#?}"
    );

    // WHEN the role makes calls the mapping to IAM does not know (ssm:DescribeParameters; an
    // object's tags, s3:GetObjectTagging, which is not s3:GetObject)
    let ((answer, lines), tags) = (
        decided(&log, || rt.block_on(role.ssm.describe_parameters().send())),
        decided(&log, || {
            rt.block_on(
                role.s3
                    .get_object_tagging()
                    .bucket(&bucket)
                    .key(&agent)
                    .send(),
            )
        }),
    );
    // THEN both are refused as AWS refuses an unauthorized call, recorded Unmapped
    let e = answer.expect_err("an unmapped DescribeParameters was let through");
    assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
    assert!(
        lines.len() == 1 && lines[0]["result"] == "Unmapped",
        "{lines:#?}"
    );
    let e = tags
        .0
        .expect_err("an unmapped GetObjectTagging was let through");
    assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
    assert!(
        tags.1.len() == 1 && tags.1[0]["result"] == "Unmapped",
        "{:#?}",
        tags.1
    );
    // AND the administrator's same calls succeed
    assert_control(
        "DescribeParameters as the administrator",
        decided(&log, || rt.block_on(admin.ssm.describe_parameters().send())),
    );
    assert_control(
        "GetObjectTagging as the administrator",
        decided(&log, || {
            rt.block_on(
                admin
                    .s3
                    .get_object_tagging()
                    .bucket(&bucket)
                    .key(&agent)
                    .send(),
            )
        }),
    );
    // AND a rehearsal test that asserts everything was allowed fails on them, naming them
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.assert_all_allowed()))
        .expect_err(
            "assert_all_allowed passed with Unmapped, unsigned and unknown-key requests in the log",
        );
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("(Unmapped)") && message.contains("AmazonSSM.DescribeParameters"),
        "{message}"
    );
}

#[test]
fn run_instances_is_evaluated_on_its_real_subnet_security_group_key_pair_and_launch_template() {
    // GIVEN the deployed stack, a key pair and a launch template made by the administrator, an
    // Amazon image, and the launch function's credentials
    let r = Rehearsal::deploy();
    let rt = runtime();
    let admin = Clients::of(&r.admin(&rt));
    rt.block_on(admin.ec2.create_key_pair().key_name("kiln-probe").send())
        .expect("CreateKeyPair");
    let template = rt
        .block_on(
            admin
                .ec2
                .create_launch_template()
                .launch_template_name("kiln-probe")
                .launch_template_data(RequestLaunchTemplateData::builder().build())
                .send(),
        )
        .expect("CreateLaunchTemplate")
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .expect("an id")
        .to_string();
    let image = rt
        .block_on(admin.ec2.describe_images().owners("amazon").send())
        .expect("DescribeImages")
        .images()
        .iter()
        .find_map(|i| i.image_id().map(str::to_string))
        .expect("an Amazon image");
    // (what EC2 launches into when the request names no network: the zone's default subnet and
    // its VPC's default group)
    let subnet = rt
        .block_on(
            admin
                .ec2
                .describe_subnets()
                .filters(
                    Filter::builder()
                        .name("default-for-az")
                        .values("true")
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("availability-zone")
                        .values("us-east-1a")
                        .build(),
                )
                .send(),
        )
        .expect("DescribeSubnets")
        .subnets()
        .first()
        .and_then(|s| Some((s.subnet_id()?.to_string(), s.vpc_id()?.to_string())))
        .expect("the default subnet of us-east-1a");
    let group = rt
        .block_on(
            admin
                .ec2
                .describe_security_groups()
                .filters(Filter::builder().name("vpc-id").values(&subnet.1).build())
                .filters(
                    Filter::builder()
                        .name("group-name")
                        .values("default")
                        .build(),
                )
                .send(),
        )
        .expect("DescribeSecurityGroups")
        .security_groups()
        .first()
        .and_then(|g| g.group_id().map(str::to_string))
        .expect("the default VPC's default group");
    let profile = r.outputs["BuilderInstanceProfileName"].clone();
    let launcher = Clients::of(&r.as_function(&rt, "LaunchBuilderFunction"));
    let log = || r.decisions();
    let arn = |kind: &str, id: &str| format!("arn:aws:ec2:{REGION}:{ACCOUNT}:{kind}/{id}");

    // WHEN the launch function launches with a key pair
    let (answer, lines) = decided(&log, || {
        rt.block_on(launch(&launcher.ec2, &image, &profile, "kiln-probe", None))
    });
    // THEN it is allowed, each of the real subnet, group and key pair evaluated
    assert_control(
        "RunInstances with a key pair as the launch function",
        (answer, lines.clone()),
    );
    for resource in [
        arn("subnet", &subnet.0),
        arn("security-group", &group),
        arn("key-pair", "kiln-probe"),
    ] {
        assert!(
            lines.iter().any(|d| d["action"] == "ec2:RunInstances"
                && d["resource"] == resource.as_str()
                && d["result"] == "Allowed"),
            "{resource}: {lines:#?}"
        );
    }

    // WHEN it launches from a launch template (the stack grants none)
    let (answer, lines) = decided(&log, || {
        rt.block_on(launch(
            &launcher.ec2,
            &image,
            &profile,
            "kiln-probe",
            Some(&template),
        ))
    });
    // THEN it is refused, by the evaluator's denial of that very template
    let e = answer.expect_err("RunInstances from a launch template the stack was not granted");
    assert_eq!(e.code(), Some("UnauthorizedOperation"), "{e:?}");
    let last = lines.last().expect("a decision");
    assert!(
        last["action"] == "ec2:RunInstances"
            && last["resource"] == arn("launch-template", &template).as_str()
            && last["result"] == "ImplicitlyDenied",
        "{lines:#?}"
    );
    // AND the administrator's same launch succeeds
    assert_control(
        "RunInstances from the launch template as the administrator",
        decided(&log, || {
            rt.block_on(launch(
                &admin.ec2,
                &image,
                &profile,
                "kiln-probe",
                Some(&template),
            ))
        }),
    );
}
