//! The deployment rehearsal: the stack as CloudFormation runs it, deployed on this machine, and
//! every AWS request of every function authorized against that function's own role.
//!
//! 1. `infra/template.yaml` expanded by aws-sam-translator (`infra/expand.py`), checked by
//!    cfn-lint, deployed into moto's CloudFormation with the functions' real bootstraps as code
//!    (`tests/rehearsal/deploy.py`; what moto's CloudFormation cannot create is made through its
//!    own API and listed in the README).
//! 2. A build runs the definition read back from the deployed state machine in kiln's engine;
//!    each Task invokes the function's real `bootstrap` over the Lambda Runtime API with the
//!    deployed function's environment and credentials of its own role (AssumeRole).
//! 3. moto runs behind `tests/rehearsal/moto_server.py`: each request signed by a role is turned
//!    into the IAM requests AWS would evaluate and decided by @cloud-copilot/iam-simulate; a deny
//!    is answered as AWS answers it, and the test fails naming function, action and resource.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln::engine::{clock::VirtualClock, definition, Engine, StateError, Status, Tasks};
use serde_json::{json, Value as Json};

use crate::support::{built_binary, repo, Moto};

const STACK: &str = "kiln";

fn python() -> PathBuf {
    let p = std::env::var_os("KILN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(p.is_file(), "{} not found: run `make setup`", p.display());
    p
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("the tool runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The template CloudFormation runs, written to `dir/expanded.json`.
fn expand(dir: &Path) -> PathBuf {
    let out = dir.join("expanded.json");
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("infra/expand.py"))
        .arg(repo().join("infra/template.yaml"))
        .arg("-o")
        .arg(&out)
        .args(["--parameter", "Architecture=x86_64"]);
    run_ok(cmd);
    out
}

/// A function as deployed: its bootstrap, environment and role credentials.
#[derive(Debug, Clone)]
struct Deployed {
    function_name: String,
    binary: String,
    env: Vec<(String, String)>,
}

/// The deployed stack on an authorizing moto server.
struct Rehearsal {
    moto: Moto,
    log: PathBuf,
    _dir: tempfile::TempDir,
    outputs: BTreeMap<String, String>,
    definition: Json,
    functions: HashMap<String, Deployed>,
    made_by_api: Vec<String>,
}

impl Rehearsal {
    fn deploy() -> Rehearsal {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("authz.jsonl");
        let moto = Moto::start_authorizing(&log);
        let expanded = expand(dir.path());
        let bin_dir = built_binary("launch-builder")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/rehearsal/deploy.py"))
            .arg(&expanded)
            .arg(&bin_dir)
            .arg(STACK)
            .envs(moto.env());
        let deployed: Json = serde_json::from_str(&run_ok(cmd)).expect("deploy.py prints JSON");
        let mut functions = HashMap::new();
        for (arn, f) in deployed["functions"].as_object().expect("functions") {
            let mut env: Vec<(String, String)> = f["environment"]
                .as_object()
                .into_iter()
                .flatten()
                .chain(f["credentials"].as_object().into_iter().flatten())
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            env.extend([
                ("AWS_REGION".into(), "us-east-1".into()),
                ("AWS_ENDPOINT_URL".into(), moto.endpoint()),
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
                ("AWS_MAX_ATTEMPTS".into(), "1".into()),
            ]);
            functions.insert(
                arn.clone(),
                Deployed {
                    function_name: f["functionName"].as_str().unwrap_or_default().into(),
                    binary: f["binary"].as_str().unwrap_or_default().into(),
                    env,
                },
            );
        }
        let outputs = deployed["outputs"]
            .as_object()
            .expect("outputs")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let definition: Json =
            serde_json::from_str(deployed["definition"].as_str().expect("definition"))
                .expect("the deployed definition is JSON");
        let made_by_api = deployed["madeByApi"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        Rehearsal {
            moto,
            log,
            _dir: dir,
            outputs,
            definition,
            functions,
            made_by_api,
        }
    }

    /// `kiln …` as the account's administrator (the deployer), against this moto.
    fn kiln(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(built_binary("kiln"))
            .args(args)
            .envs(self.moto.env())
            .env("AWS_MAX_ATTEMPTS", "2")
            .env_remove("KILN_HOME")
            .output()
            .expect("kiln");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Every authorization decision so far.
    fn decisions(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

/// Task states as Lambda runs them: the function's bootstrap, one invocation each, over the
/// Runtime API, with the deployed environment and the function's role credentials.
struct Bootstraps(HashMap<String, Deployed>);

impl Tasks for Bootstraps {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        _state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            let f = self.0.get(resource).cloned().ok_or_else(|| {
                StateError::new(
                    "Lambda.ResourceNotFoundException",
                    format!("no deployed function {resource}"),
                )
            })?;
            let answer = tokio::task::spawn_blocking(move || {
                let env: Vec<(&str, String)> =
                    f.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                kiln_tests::runtime_api::invoke_once(
                    &built_binary(&f.binary),
                    &f.function_name,
                    &input,
                    &env,
                )
            })
            .await
            .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?
            .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?;
            let (path, body) = answer.answer;
            if path.ends_with("/response") {
                Ok(body)
            } else {
                Err(StateError::from_lambda(
                    body["errorType"].as_str().unwrap_or("Lambda.Unknown"),
                    body["errorMessage"].as_str().unwrap_or_default(),
                ))
            }
        })
    }
}

/// The denied or unmapped requests, one line each: function, action, resource.
fn denials(decisions: &[Json]) -> Vec<String> {
    decisions
        .iter()
        .filter(|d| d["result"] != "Allowed")
        .map(|d| {
            format!(
                "{} {}: {} on {} ({}) {}",
                d["role"].as_str().unwrap_or_default(),
                d["operation"].as_str().unwrap_or_default(),
                d["action"].as_str().unwrap_or_default(),
                d["resource"].as_str().unwrap_or_default(),
                d["result"].as_str().unwrap_or_default(),
                d["why"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// Actions each deployed role is granted (as written in its policies, wildcards kept) that no
/// request in `decisions` used.
fn granted_but_unused(expanded: &Json, decisions: &[Json]) -> BTreeMap<String, Vec<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in decisions {
        let role = d["role"].as_str().unwrap_or_default();
        // Physical role names are <stack>-<LogicalId>-<suffix>.
        let logical = role.split('-').nth(1).unwrap_or(role).to_string();
        used.entry(logical)
            .or_default()
            .insert(d["action"].as_str().unwrap_or_default().to_string());
    }
    let mut out = BTreeMap::new();
    for (name, r) in expanded["Resources"].as_object().into_iter().flatten() {
        if r["Type"] != "AWS::IAM::Role" || !name.ends_with("FunctionRole") {
            continue;
        }
        let mut granted = BTreeSet::new();
        for p in r["Properties"]["Policies"].as_array().into_iter().flatten() {
            for s in p["PolicyDocument"]["Statement"]
                .as_array()
                .into_iter()
                .flatten()
            {
                match &s["Action"] {
                    Json::String(a) => {
                        granted.insert(a.clone());
                    }
                    Json::Array(a) => granted.extend(a.iter().filter_map(|x| x.as_str().map(String::from))),
                    _ => {}
                }
            }
        }
        let empty = BTreeSet::new();
        let used = used.get(name.as_str()).unwrap_or(&empty);
        let unused: Vec<String> = granted
            .into_iter()
            .filter(|g| !used.contains(g))
            .collect();
        out.insert(name.clone(), unused);
    }
    out
}

#[test]
fn the_expanded_template_has_no_cfn_lint_errors() {
    // GIVEN the template as CloudFormation expands it (aws-sam-translator, definition inlined)
    let dir = tempfile::tempdir().expect("dir");
    let expanded = expand(dir.path());
    // WHEN cfn-lint reads it (its cycle rule skips AWS::Serverless::* in the SAM file)
    let lint = std::env::var_os("KILN_CFN_LINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/cfn-lint"));
    let mut cmd = Command::new(lint);
    cmd.arg(&expanded);
    // THEN it reports nothing: no dependency cycle, no bad property
    run_ok(cmd);
}

/// The regression the rehearsal was made for: a stack tag forged by nobody, a `kiln:build-id`
/// tag on someone else's instance, cannot make a function terminate it.
#[test]
fn a_build_runs_through_the_deployed_stack_with_every_request_authorized() {
    // GIVEN the stack deployed into moto's CloudFormation, every function's role in force
    let r = Rehearsal::deploy();
    assert_eq!(
        r.made_by_api,
        vec!["ArtifactsBucketPolicy", "CleanupFunctionDailyLifecycle"],
        "the resources moto's CloudFormation cannot create (listed in the README)"
    );
    assert_eq!(r.functions.len(), 7, "{:?}", r.functions.keys());
    // AND the pipeline applied to it by its administrator
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("pipeline.yaml");
    let text = std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .expect("read")
        .replace(
            "../../../../examples/aws-al2023/components/harden.yaml",
            &repo()
                .join("examples/aws-al2023/components/harden.yaml")
                .display()
                .to_string(),
        );
    std::fs::write(&file, text).expect("write");
    let (code, out, err) = r.kiln(&["apply", &file.display().to_string(), "--stack", STACK]);
    assert_eq!(code, 0, "{out}{err}");

    // WHEN a build runs the deployed definition, each Task a real bootstrap under its own role
    let machine = definition::parse(&r.definition).expect("the deployed definition parses");
    let engine = Engine::new(
        Arc::new(Bootstraps(r.functions.clone())),
        Arc::new(VirtualClock::default()),
        true,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = rt.block_on(engine.run(
        &machine,
        json!({"pipeline": "al2023-moto", "trigger": {"kind": "manual"}, "waitSeconds": 0}),
        "rehearsal-1",
    ));

    // THEN no request was denied, and the build is AVAILABLE in both regions
    let decisions = r.decisions();
    let denied = denials(&decisions);
    assert!(
        denied.is_empty(),
        "denied by the deployed roles:\n{}",
        denied.join("\n")
    );
    assert_eq!(
        outcome.status,
        Status::Succeeded,
        "{:?} {:?}",
        outcome.error,
        outcome.cause
    );
    let output = outcome.output.expect("output");
    assert_eq!(output["status"], "AVAILABLE", "{output}");
    let regions: BTreeSet<&str> = output["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["region"].as_str())
        .collect();
    assert_eq!(
        regions,
        BTreeSet::from(["eu-central-1", "us-east-1"]),
        "{output}"
    );
    // AND nothing of the build runs, counted by raw DescribeInstances in every region
    let config = rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(r.moto.endpoint())
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load(),
    );
    for region in ["us-east-1", "eu-central-1"] {
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&config)
                .region(aws_sdk_ec2::config::Region::new(region))
                .build(),
        );
        let live: Vec<String> = rt
            .block_on(ec2.describe_instances().send())
            .expect("DescribeInstances")
            .reservations()
            .iter()
            .flat_map(|res| res.instances())
            .filter(|i| {
                i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated")
            })
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        assert!(live.is_empty(), "{region}: instances left {live:?}");
    }
    assert!(r.outputs["StateMachineArn"].ends_with(":stateMachine:kiln-pipeline"));
    // AND every function made requests, each one evaluated
    let by_role: BTreeMap<String, usize> = decisions.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(
            d["role"]
                .as_str()
                .unwrap_or_default()
                .split('-')
                .nth(1)
                .unwrap_or_default()
                .to_string(),
        )
        .or_default() += 1;
        m
    });
    for f in [
        "LaunchBuilderFunctionRole",
        "CustomizeFunctionRole",
        "SnapshotFunctionRole",
        "TestImageFunctionRole",
        "DistributeFunctionRole",
    ] {
        assert!(by_role.get(f).copied().unwrap_or(0) > 0, "{f}: {by_role:?}");
    }
    // AND the report of what is granted and never used
    let expanded: Json = serde_json::from_str(
        &std::fs::read_to_string(expand(dir.path())).expect("expanded"),
    )
    .expect("json");
    let unused = granted_but_unused(&expanded, &decisions);
    eprintln!(
        "rehearsal: {} requests evaluated, {} denied; by role {by_role:?}\ngranted but unused: {}",
        decisions.len(),
        denied.len(),
        serde_json::to_string_pretty(&unused).unwrap_or_default()
    );
}
