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

use aws_sdk_dynamodb::types::AttributeValue;
use kiln::engine::{
    clock::VirtualClock, definition, tokens::TaskTokens, Engine, StateError, Status, Tasks,
};
use serde_json::{json, Value as Json};

use crate::support::{built_binary, repo, run_ok, Lcg, Moto};

pub(crate) const STACK: &str = "kiln";

pub(crate) fn python() -> PathBuf {
    let p = std::env::var_os("KILN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/python/bin/python"));
    assert!(p.is_file(), "{} not found: run `make setup`", p.display());
    p
}

/// The template CloudFormation runs, written to `dir/expanded.json`.
pub(crate) fn expand(dir: &Path) -> PathBuf {
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
pub(crate) struct Deployed {
    pub(crate) function_name: String,
    pub(crate) binary: String,
    /// The bootstrap an invocation runs: the debug build of `binary`, or the release one
    /// (`Rehearsal::deploy_running`).
    pub(crate) path: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    /// The role the deployed state machine invokes the function as: each Task's invocation is
    /// first authorized as that role (a signed DryRun Invoke, see [`ServiceRole::may_invoke`]).
    pub(crate) invoker: Option<Arc<ServiceRole>>,
}

/// A role an AWS service acts as for the stack (the state machine's, a schedule's), with
/// credentials of it (deploy.py's AssumeRole): what the service's calls are signed with here.
#[derive(Debug)]
pub(crate) struct ServiceRole {
    pub(crate) arn: String,
    endpoint: String,
    key: String,
    secret: String,
    token: String,
}

impl ServiceRole {
    pub(crate) fn new(
        arn: String,
        endpoint: String,
        key: String,
        secret: String,
        token: String,
    ) -> ServiceRole {
        ServiceRole {
            arn,
            endpoint,
            key,
            secret,
            token,
        }
    }

    /// The role's AWS configuration against moto (no retries: a refusal is the first answer).
    pub(crate) fn config(&self, rt: &tokio::runtime::Runtime) -> aws_config::SdkConfig {
        rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(&self.endpoint)
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                    &self.key,
                    &self.secret,
                    Some(self.token.clone()),
                    None,
                    "service-role",
                ))
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .load(),
        )
    }

    /// Lambda's Invoke of `function` (an ARN) with `InvocationType: DryRun`, signed (SigV4, the
    /// session token included) with this role's credentials: Lambda then checks only that the
    /// caller may invoke the function, `lambda:InvokeFunction` by its identity policies and the
    /// function's resource policy, which is what Step Functions' invocation as the state
    /// machine's role needs. Ok, or AWS's answer: (status, error code, message).
    pub(crate) fn may_invoke(&self, function: &str) -> Result<(), (u16, String, String)> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        use std::io::{Read, Write};
        let host = self.endpoint.trim_start_matches("http://").to_string();
        let encoded: String = function
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let path = format!("/2015-03-31/functions/{encoded}/invocations");
        let url = format!("{}{path}", self.endpoint);
        let body = b"{}";
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/json"),
            ("x-amz-invocation-type", "DryRun"),
        ];
        let identity: aws_smithy_runtime_api::client::identity::Identity =
            aws_sdk_ec2::config::Credentials::new(
                &self.key,
                &self.secret,
                Some(self.token.clone()),
                None,
                "service-role",
            )
            .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("lambda")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .expect("signing parameters")
            .into();
        let request = SignableRequest::new(
            "POST",
            &url,
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .expect("a signable request");
        let (instructions, _) = sign(request, &params).expect("signed").into_parts();
        let (signed, _) = instructions.into_parts();
        let mut s = std::net::TcpStream::connect(&host).expect("connect to moto");
        let mut head = format!("POST {path} HTTP/1.1\r\n");
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        for h in &signed {
            head += &format!("{}: {}\r\n", h.name(), h.value());
        }
        head += &format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body).expect("body");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status: u16 = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status == 204 {
            return Ok(());
        }
        let answer: Json = out
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(Json::Null);
        Err((
            status,
            answer["__type"].as_str().unwrap_or("Unknown").to_string(),
            answer["message"].as_str().unwrap_or(&out).to_string(),
        ))
    }
}

/// The deployed stack on an authorizing moto server.
pub(crate) struct Rehearsal {
    pub moto: Moto,
    log: PathBuf,
    faults: PathBuf,
    _dir: tempfile::TempDir,
    pub outputs: BTreeMap<String, String>,
    definition: Json,
    pub(crate) functions: HashMap<String, Deployed>,
    made_by_api: Vec<String>,
    /// The roles AWS services act as for the stack, by ARN (see [`ServiceRole`]).
    pub(crate) service_roles: HashMap<String, Arc<ServiceRole>>,
    /// The deployed state machine's role.
    pub(crate) state_machine_role: String,
    /// The task tokens of the executions, answered by the deployed functions' SendTaskSuccess
    /// (moto_server.py hands each to [`forward_answers`]).
    tokens: Arc<TaskTokens>,
}

/// Hands each SendTaskSuccess the deployed functions make (authorized, then appended to `file` by
/// moto_server.py) to the engine that issued the token, as Step Functions would take it.
fn forward_answers(file: PathBuf, tokens: Arc<TaskTokens>) {
    std::thread::spawn(move || {
        let mut seen = 0;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let Ok(text) = std::fs::read_to_string(&file) else {
                return; // the rehearsal's folder is gone
            };
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[seen.min(lines.len())..] {
                if let Ok(a) = serde_json::from_str::<Json>(line) {
                    let output = a["output"]
                        .as_str()
                        .and_then(|o| serde_json::from_str(o).ok())
                        .unwrap_or(Json::Null);
                    let _ = tokens.succeed(a["taskToken"].as_str().unwrap_or_default(), output);
                }
            }
            seen = lines.len();
        }
    });
}

impl Rehearsal {
    pub fn deploy() -> Rehearsal {
        Rehearsal::deploy_running(None)
    }

    /// The stack deployed, its invocations running the bootstraps `make package` built in
    /// `lambda_dir` (`<function>/bootstrap`) in place of the debug ones.
    pub fn deploy_running(lambda_dir: Option<&Path>) -> Rehearsal {
        Rehearsal::deploy_full(lambda_dir, &json!({}))
    }

    /// The stack deployed with these template parameters beside Architecture and AgentSha256
    /// (e.g. `{"EventBusName": "kiln-bus"}`; tests/rehearsal/deploy.py makes a named bus first).
    pub fn deploy_with(parameters: &Json) -> Rehearsal {
        Rehearsal::deploy_full(None, parameters)
    }

    fn deploy_full(lambda_dir: Option<&Path>, parameters: &Json) -> Rehearsal {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("authz.jsonl");
        let faults = dir.path().join("faults.json");
        let answers = dir.path().join("answers.jsonl");
        std::fs::write(&answers, "").expect("answers file");
        let moto = Moto::start_authorizing(&log, &faults, &answers);
        let tokens = Arc::new(TaskTokens::default());
        forward_answers(answers, tokens.clone());
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
            .envs(moto.env())
            .env("KILN_DEPLOY_PARAMETERS", parameters.to_string());
        let deployed: Json = serde_json::from_str(&run_ok(cmd)).expect("deploy.py prints JSON");
        let service_roles: HashMap<String, Arc<ServiceRole>> = deployed["serviceRoles"]
            .as_object()
            .expect("serviceRoles")
            .iter()
            .map(|(arn, c)| {
                let v = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                let role = ServiceRole::new(
                    arn.clone(),
                    moto.endpoint(),
                    v("AWS_ACCESS_KEY_ID"),
                    v("AWS_SECRET_ACCESS_KEY"),
                    v("AWS_SESSION_TOKEN"),
                );
                (arn.clone(), Arc::new(role))
            })
            .collect();
        let state_machine_role: String = deployed["stateMachineRole"]
            .as_str()
            .expect("stateMachineRole")
            .into();
        let invoker = service_roles.get(&state_machine_role).cloned();
        assert!(
            invoker.is_some(),
            "no credentials of the state machine's role"
        );
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
                ("AWS_ENDPOINT_URL".into(), moto.tls_endpoint()),
                // The Lambda runtime's CA bundle, in AWS; here the rehearsal's own certificate.
                (
                    "SSL_CERT_FILE".into(),
                    moto.certificate().display().to_string(),
                ),
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ]);
            let binary: String = f["binary"].as_str().unwrap_or_default().into();
            let path = match lambda_dir {
                Some(dir) => dir.join(&binary).join("bootstrap"),
                None => built_binary(&binary),
            };
            functions.insert(
                arn.clone(),
                Deployed {
                    function_name: f["functionName"].as_str().unwrap_or_default().into(),
                    binary,
                    path,
                    env,
                    invoker: invoker.clone(),
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
            faults,
            _dir: dir,
            outputs,
            definition,
            functions,
            made_by_api,
            service_roles,
            state_machine_role,
            tokens,
        }
    }

    /// `kiln …` as the account's administrator (the deployer), against this moto.
    pub fn kiln(&self, args: &[&str]) -> (i32, String, String) {
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

    /// The faults moto injects from now on (tests/rehearsal/moto_server.py).
    pub(crate) fn inject(&self, faults: Json) {
        std::fs::write(&self.faults, faults.to_string()).expect("faults");
    }

    /// The deployed function whose logical id is `logical` (e.g. "TriggerFunction").
    pub fn function(&self, logical: &str) -> Deployed {
        self.functions
            .values()
            .find(|f| f.function_name.contains(&format!("-{logical}-")))
            .cloned()
            .unwrap_or_else(|| panic!("no deployed {logical}"))
    }

    /// Invokes a deployed function once, as Lambda would: (response or error body, ok?).
    pub fn invoke(&self, logical: &str, event: Json) -> (bool, Json) {
        let f = self.function(logical);
        let env: Vec<(&str, String)> = f.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let (path, body) =
            kiln_tests::runtime_api::invoke_once(&f.path, &f.function_name, &event, &env)
                .expect("the function answered")
                .answer;
        (path.ends_with("/response"), body)
    }

    /// Applies a pipeline file's text (component paths made absolute) to the stack, as its
    /// administrator would.
    pub fn apply(&self, text: &str) {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pipeline.yaml");
        let text = text.replace(
            "../../../../examples/aws-al2023/components/harden.yaml",
            &repo()
                .join("examples/aws-al2023/components/harden.yaml")
                .display()
                .to_string(),
        );
        std::fs::write(&file, text).expect("write");
        let (code, out, err) = self.kiln(&["apply", &file.display().to_string(), "--stack", STACK]);
        assert_eq!(code, 0, "kiln apply: {out}{err}");
    }

    /// One execution of the deployed definition, each Task the function's bootstrap.
    pub fn execute(
        &self,
        rt: &tokio::runtime::Runtime,
        pipeline: &str,
        name: &str,
    ) -> kiln::engine::Outcome {
        self.execute_with(
            rt,
            Arc::new(Bootstraps(self.functions.clone(), None)),
            pipeline,
            name,
        )
    }

    /// One execution as the pipeline's schedule (`kiln-<pipeline>`) starts it: see
    /// [`Rehearsal::fire_schedule`]; the schedule's role must be allowed to start it.
    pub fn execute_scheduled(
        &self,
        rt: &tokio::runtime::Runtime,
        pipeline: &str,
        name: &str,
    ) -> kiln::engine::Outcome {
        let schedule = kiln::aws::control::schedule_name(pipeline);
        self.fire_schedule(rt, &schedule, name).unwrap_or_else(|e| {
            panic!("the schedule {schedule} could not start its execution: {e}")
        })
    }

    /// What EventBridge Scheduler does when `schedule` fires: StartExecution of its target with
    /// its input, signed as its role (credentials deploy.py assumed; the evaluator decides
    /// `states:StartExecution` on the target as that role), then the execution run in the engine
    /// (with the rehearsal's poll interval). Err: AWS's error code and message when the role is
    /// refused, nothing run.
    pub fn fire_schedule(
        &self,
        rt: &tokio::runtime::Runtime,
        schedule: &str,
        name: &str,
    ) -> Result<kiln::engine::Outcome, String> {
        let admin = self.admin(rt);
        let s = rt
            .block_on(
                aws_sdk_scheduler::Client::new(&admin)
                    .get_schedule()
                    .name(schedule)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("GetSchedule {schedule}: {e:?}"));
        let target = s.target().expect("the schedule's target");
        let role = self
            .service_roles
            .get(target.role_arn())
            .unwrap_or_else(|| {
                panic!(
                    "no credentials of the schedule's role {}: deploy.py assumes the roles the stack's schedules name",
                    target.role_arn()
                )
            });
        let sfn = aws_sdk_sfn::Client::new(&role.config(rt));
        let input = target.input().unwrap_or("{}");
        rt.block_on(
            sfn.start_execution()
                .state_machine_arn(target.arn())
                .input(input)
                .send(),
        )
        .map_err(|e| {
            use aws_sdk_sfn::error::ProvideErrorMetadata;
            format!(
                "{}: {}",
                e.code().unwrap_or("?"),
                e.message().unwrap_or_default()
            )
        })?;
        let mut input: Json = serde_json::from_str(input).expect("the schedule's input is JSON");
        input["waitSeconds"] = json!(1);
        Ok(self.run_input(
            rt,
            Arc::new(Bootstraps(self.functions.clone(), None)),
            input,
            name,
        ))
    }

    /// One execution of the deployed definition with its Tasks delivered by `tasks`.
    pub(crate) fn execute_with(
        &self,
        rt: &tokio::runtime::Runtime,
        tasks: Arc<dyn Tasks>,
        pipeline: &str,
        name: &str,
    ) -> kiln::engine::Outcome {
        self.run_input(
            rt,
            tasks,
            json!({"pipeline": pipeline, "trigger": {"kind": "manual"}, "waitSeconds": 1}),
            name,
        )
    }

    /// One execution of the deployed definition on exactly `input`, each Task the function's
    /// bootstrap.
    pub fn execute_input(
        &self,
        rt: &tokio::runtime::Runtime,
        input: Json,
        name: &str,
    ) -> kiln::engine::Outcome {
        self.run_input(
            rt,
            Arc::new(Bootstraps(self.functions.clone(), None)),
            input,
            name,
        )
    }

    /// An execution that may be stopped: `None` when `stop` fired first.
    fn execute_until(
        &self,
        rt: &tokio::runtime::Runtime,
        tasks: Arc<dyn Tasks>,
        pipeline: &str,
        name: &str,
        stop: Arc<tokio::sync::Notify>,
    ) -> Option<kiln::engine::Outcome> {
        let machine = definition::parse(&self.definition).expect("the deployed definition parses");
        let engine = Engine::new(tasks, Arc::new(VirtualClock::default()), true)
            .with_tokens(self.tokens.clone());
        let input = json!({"pipeline": pipeline, "trigger": {"kind": "manual"}, "waitSeconds": 1});
        rt.block_on(async {
            tokio::select! {
                out = engine.run(&machine, input, name) => Some(out),
                _ = stop.notified() => None,
            }
        })
    }

    fn run_input(
        &self,
        rt: &tokio::runtime::Runtime,
        tasks: Arc<dyn Tasks>,
        input: Json,
        name: &str,
    ) -> kiln::engine::Outcome {
        let machine = definition::parse(&self.definition).expect("the deployed definition parses");
        let engine = Engine::new(tasks, Arc::new(VirtualClock::default()), true)
            .with_tokens(self.tokens.clone());
        rt.block_on(engine.run(&machine, input, name))
    }

    /// The account's administrator's AWS configuration, for raw Describe* calls.
    pub fn admin(&self, rt: &tokio::runtime::Runtime) -> aws_config::SdkConfig {
        rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(self.moto.endpoint())
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                    "testing", "testing", None, None, "test",
                ))
                .load(),
        )
    }

    /// The AWS configuration a function's bootstrap has: its role's credentials as Lambda hands
    /// them over, and moto's TLS endpoint. No retries: a refusal is the first answer.
    pub fn as_function(
        &self,
        rt: &tokio::runtime::Runtime,
        logical: &str,
    ) -> aws_config::SdkConfig {
        let f = self.function(logical);
        let env = |k: &str| {
            f.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} not in {logical}'s environment"))
        };
        rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(self.moto.tls_endpoint())
                .http_client(self.moto.https_client())
                .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                    env("AWS_ACCESS_KEY_ID"),
                    env("AWS_SECRET_ACCESS_KEY"),
                    Some(env("AWS_SESSION_TOKEN")),
                    None,
                    "function-role",
                ))
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .load(),
        )
    }

    /// kiln's store in the deployed table, read as the administrator.
    pub fn store_ports(&self, rt: &tokio::runtime::Runtime) -> kiln::aws::AwsPorts {
        kiln::aws::AwsPorts::new(
            kiln::aws::Settings {
                table: self.outputs["TableName"].clone(),
                bucket: self.outputs["ArtifactsBucketName"].clone(),
                event_bus: "default".into(),
                region: "us-east-1".into(),
                stack: Some(STACK.into()),
                instance_profile: None,
            },
            self.admin(rt),
        )
    }

    /// The pipeline's lock is free, read by a raw DynamoDB GetItem of its record in the deployed
    /// table (`PIPELINE#<name>` / `LOCK`), not through kiln's store.
    pub fn assert_lock_free(&self, rt: &tokio::runtime::Runtime, pipeline: &str, what: &str) {
        let holder = self.lock_holder(rt, pipeline);
        assert!(holder.is_none(), "{what}: the lock is held by {holder:?}");
    }

    /// The resources deploy.py made through the API (what moto's CloudFormation cannot make).
    pub(crate) fn made_by_api(&self) -> &[String] {
        &self.made_by_api
    }

    /// Every authorization decision so far.
    pub(crate) fn decisions(&self) -> Vec<Json> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

/// The authorization log outlives the test in `target/tmp/rehearsal/` (one file per run), so
/// what each scenario used can be read afterwards (the granted-but-unused report across all).
impl Drop for Rehearsal {
    fn drop(&mut self) {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rehearsal");
        if std::fs::create_dir_all(&keep).is_ok() {
            let name = format!(
                "{}-{}.jsonl",
                std::thread::current()
                    .name()
                    .unwrap_or("test")
                    .replace("::", "-"),
                std::process::id()
            );
            let _ = std::fs::copy(&self.log, keep.join(name));
        }
    }
}

/// Task states as Lambda runs them: the function's bootstrap, one invocation each, over the
/// Runtime API, with the deployed environment and the function's role credentials.
pub(crate) struct Bootstraps(
    pub(crate) HashMap<String, Deployed>,
    /// Each invocation's timing, when kept (the cold-start bench).
    pub(crate) Option<Arc<std::sync::Mutex<Vec<Timing>>>>,
);

/// One invocation as the bench times it.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    pub(crate) function: String,
    pub(crate) op: String,
    pub(crate) invocation: kiln_tests::runtime_api::Invocation,
}

impl Tasks for Bootstraps {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        _state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            let call = kiln::engine::LambdaCall::of(resource, input);
            let resource = call.function.as_str();
            let input = call.payload.clone();
            let f = self.0.get(resource).cloned().ok_or_else(|| {
                StateError::new(
                    "Lambda.ResourceNotFoundException",
                    format!("no deployed function {resource}"),
                )
            })?;
            // As Step Functions invokes it: as the state machine's role, which must be allowed
            // to (AWS's answer otherwise fails the Task, for its Retry and Catch to see).
            if let Some(role) = f.invoker.clone() {
                let function = resource.to_string();
                let allowed = tokio::task::spawn_blocking(move || role.may_invoke(&function))
                    .await
                    .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?;
                if let Err((status, code, message)) = allowed {
                    return Err(StateError::new(
                        "Lambda.AWSLambdaException",
                        format!("{message} (Service: AWSLambda; Status Code: {status}; Error Code: {code})"),
                    ));
                }
            }
            let op = input["op"].as_str().unwrap_or("-").to_string();
            let binary = f.binary.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let env: Vec<(&str, String)> =
                    f.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                kiln_tests::runtime_api::invoke_once(&f.path, &f.function_name, &input, &env)
            })
            .await
            .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?
            .map_err(|e| StateError::new("Lambda.ServiceException", e.to_string()))?;
            if let Some(log) = &self.1 {
                log.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Timing {
                        function: binary,
                        op,
                        invocation: answer.clone(),
                    });
            }
            let (path, body) = answer.answer;
            if path.ends_with("/response") {
                Ok(call.result(body))
            } else {
                Err(StateError::from_lambda(
                    body["errorType"].as_str().unwrap_or("Lambda.Unknown"),
                    body["errorMessage"].as_str().unwrap_or_default(),
                ))
            }
        })
    }
}

const REGIONS: [&str; 2] = ["us-east-1", "eu-central-1"];

/// The shell text of every command SSM holds (ListCommands as the administrator).
async fn aws_sdk_ssm_list(config: &aws_config::SdkConfig) -> Vec<String> {
    let ssm = aws_sdk_ssm::Client::new(config);
    let out = ssm.list_commands().send().await.expect("ListCommands");
    out.commands()
        .iter()
        .map(|c| {
            c.parameters()
                .and_then(|p| p.get("commands"))
                .map(|v| v.join("\n"))
                .unwrap_or_default()
        })
        .collect()
}

/// What the account holds, by raw Describe* calls in every region (no tag filter): instances not
/// terminated, images and snapshots the account owns.
#[derive(Debug, Default, PartialEq, Eq)]
struct Inventory {
    live_instances: BTreeSet<String>,
    images: BTreeSet<String>,
    snapshots: BTreeSet<String>,
}

fn inventory(rt: &tokio::runtime::Runtime, config: &aws_config::SdkConfig) -> Inventory {
    let mut inv = Inventory::default();
    for region in REGIONS {
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(config)
                .region(aws_sdk_ec2::config::Region::new(region))
                .build(),
        );
        rt.block_on(async {
            let instances = ec2
                .describe_instances()
                .send()
                .await
                .expect("DescribeInstances");
            for i in instances.reservations().iter().flat_map(|r| r.instances()) {
                if i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated") {
                    inv.live_instances
                        .insert(format!("{region}/{}", i.instance_id().unwrap_or_default()));
                }
            }
            let images = ec2
                .describe_images()
                .owners("self")
                .send()
                .await
                .expect("DescribeImages");
            for i in images.images() {
                inv.images
                    .insert(format!("{region}/{}", i.image_id().unwrap_or_default()));
            }
            let snapshots = ec2
                .describe_snapshots()
                .owner_ids("self")
                .send()
                .await
                .expect("DescribeSnapshots");
            for s in snapshots.snapshots() {
                inv.snapshots
                    .insert(format!("{region}/{}", s.snapshot_id().unwrap_or_default()));
            }
        });
    }
    inv
}

/// The denied or unmapped requests, one line each: function, action, resource.
fn denials(decisions: &[Json]) -> Vec<String> {
    decisions
        .iter()
        .filter(|d| d.get("fault").is_none() && d["result"] != "Allowed")
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
    for d in decisions.iter().filter(|d| d.get("action").is_some()) {
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
                    Json::Array(a) => {
                        granted.extend(a.iter().filter_map(|x| x.as_str().map(String::from)))
                    }
                    _ => {}
                }
            }
        }
        let empty = BTreeSet::new();
        let used = used.get(name.as_str()).unwrap_or(&empty);
        let unused: Vec<String> = granted.into_iter().filter(|g| !used.contains(g)).collect();
        out.insert(name.clone(), unused);
    }
    out
}

pub(crate) fn moto_pipeline() -> String {
    std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml")).expect("read")
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

impl Rehearsal {
    /// Requests per role (by logical id), and the check that none was denied.
    pub fn assert_all_allowed(&self) -> (usize, BTreeMap<String, usize>) {
        let decisions = self.decisions();
        let denied = denials(&decisions);
        assert!(
            denied.is_empty(),
            "denied by the deployed roles:\n{}",
            denied.join("\n")
        );
        let mut by_role = BTreeMap::new();
        for d in decisions.iter().filter(|d| d.get("action").is_some()) {
            let role = d["role"].as_str().unwrap_or_default();
            *by_role
                .entry(role.split('-').nth(1).unwrap_or(role).to_string())
                .or_insert(0) += 1;
        }
        (
            decisions
                .iter()
                .filter(|d| d.get("action").is_some())
                .count(),
            by_role,
        )
    }
}

#[test]
fn a_build_runs_through_the_deployed_stack_with_every_request_authorized() {
    // GIVEN the stack deployed into moto's CloudFormation, every function's role in force, its
    // functions the bootstraps one `cargo lambda build` made with the shipped features
    let lambda_dir = crate::support::shipped("lambda/launch-builder/bootstrap")
        .ancestors()
        .nth(2)
        .expect("lambda/")
        .to_path_buf();
    let r = Rehearsal::deploy_running(Some(&lambda_dir));
    assert_eq!(
        r.made_by_api,
        vec!["ArtifactsBucketPolicy", "CleanupFunctionDailyLifecycle"],
        "the resources moto's CloudFormation cannot create (listed in the README)"
    );
    assert_eq!(r.functions.len(), 8, "{:?}", r.functions.keys());
    assert!(r.outputs["StateMachineArn"].ends_with(":stateMachine:kiln-pipeline"));
    // AND the pipeline applied to it by its administrator
    r.apply(&moto_pipeline());
    let rt = runtime();
    // AND a subscriber to the stack's event bus: an EventBridge rule with an SQS queue
    let events = |args: &[&str]| {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/rehearsal/events.py"))
            .args(args)
            .envs(r.moto.env())
            .env("AWS_DEFAULT_REGION", "us-east-1");
        run_ok(cmd).trim().to_string()
    };
    let queue = events(&["subscribe", r.outputs["EventBusName"].as_str()]);

    // WHEN a build runs the deployed definition, each Task a real bootstrap under its own role
    let outcome = r.execute(&rt, "al2023-moto", "rehearsal-1");

    // THEN no request was denied, and the build is AVAILABLE in both regions
    let (evaluated, by_role) = r.assert_all_allowed();
    assert_eq!(
        outcome.status,
        Status::Succeeded,
        "{:?} {:?}",
        outcome.error,
        outcome.cause
    );
    // AND the volumes and the copy used each region's customer managed key, through EC2: what
    // EC2 asks KMS for on the caller's behalf was authorized against the caller's role
    let kms: BTreeSet<(String, String, String)> = r
        .decisions()
        .iter()
        .filter(|d| d["action"].as_str().is_some_and(|a| a.starts_with("kms:")))
        .map(|d| {
            let text = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (text("operation"), text("action"), text("resource"))
        })
        .collect();
    let key = |region: &str| format!("arn:aws:kms:{region}:123456789012:key/alias-kiln-images");
    for (operation, action, region) in [
        ("RunInstances", "kms:CreateGrant", "us-east-1"),
        (
            "RunInstances",
            "kms:GenerateDataKeyWithoutPlaintext",
            "us-east-1",
        ),
        ("CopyImage", "kms:CreateGrant", "eu-central-1"),
        ("CopyImage", "kms:Encrypt", "eu-central-1"),
    ] {
        assert!(
            kms.contains(&(operation.into(), action.into(), key(region))),
            "{operation} {action} on {region}'s key: {kms:?}"
        );
    }
    let output = outcome.output.expect("output");
    assert_eq!(output["status"], "AVAILABLE", "{output}");
    let regions: BTreeMap<&str, &str> = output["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["region"].as_str()?, e["image"].as_str()?)))
        .collect();
    assert_eq!(
        regions.keys().copied().collect::<Vec<_>>(),
        ["eu-central-1", "us-east-1"],
        "{output}"
    );
    // AND the subscriber got an event for every status change, in order, as EventBridge
    // delivered them, the last naming the images
    let delivered: Json = serde_json::from_str(&events(&["drain", &queue])).expect("JSON");
    let states: Vec<&str> = delivered
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["detail"]["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        states,
        [
            "BUILDING",
            "SNAPSHOTTING",
            "TESTING",
            "DISTRIBUTING",
            "AVAILABLE"
        ],
        "{delivered}"
    );
    let last = &delivered[4];
    assert_eq!(last["source"], "kiln");
    assert_eq!(last["detail"]["pipeline"], "al2023-moto");
    assert_eq!(
        last["detail"]["images"].as_object().map(|m| m.len()),
        Some(2),
        "{last}"
    );
    // AND nothing of the build runs, and each region holds its image with snapshots, all tagged
    // by the stack, counted by raw Describe* calls
    let admin = r.admin(&rt);
    let inv = inventory(&rt, &admin);
    assert!(
        inv.live_instances.is_empty(),
        "instances left: {:?}",
        inv.live_instances
    );
    for (region, image) in &regions {
        assert!(
            inv.images.contains(&format!("{region}/{image}")),
            "{region}: {inv:?}"
        );
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&admin)
                .region(aws_sdk_ec2::config::Region::new(region.to_string()))
                .build(),
        );
        let snaps = rt
            .block_on(
                ec2.describe_snapshots()
                    .owner_ids("self")
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("tag:kiln:stack")
                            .values(STACK)
                            .build(),
                    )
                    .send(),
            )
            .expect("DescribeSnapshots");
        assert!(
            !snaps.snapshots().is_empty(),
            "{region}: no snapshot tagged by the stack"
        );
        // The region's distribution tags on its image and every snapshot of it, the build
        // region's included.
        let has_os = |tags: &[aws_sdk_ec2::types::Tag]| {
            tags.iter()
                .any(|t| t.key() == Some("os") && t.value() == Some("al2023"))
        };
        let described = rt
            .block_on(ec2.describe_images().image_ids(image.to_string()).send())
            .expect("DescribeImages");
        let img = described.images().first().expect("the image");
        assert!(has_os(img.tags()), "{region}: image tags {:?}", img.tags());
        let shared_with = if *region == "us-east-1" {
            "111122223333"
        } else {
            "444455556666"
        };
        for s in snaps.snapshots() {
            assert!(has_os(s.tags()), "{region}: snapshot tags {:?}", s.tags());
            // AND the accounts the image is shared with may read its snapshots (to copy it)
            let attr = rt
                .block_on(
                    ec2.describe_snapshot_attribute()
                        .snapshot_id(s.snapshot_id().unwrap_or_default())
                        .attribute(
                            aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission,
                        )
                        .send(),
                )
                .expect("DescribeSnapshotAttribute");
            let users: Vec<&str> = attr
                .create_volume_permissions()
                .iter()
                .filter_map(|p| p.user_id())
                .collect();
            assert_eq!(users, [shared_with], "{region}: {:?}", s.snapshot_id());
        }
    }
    // AND the instances were launched as a reviewer wants them (raw DescribeInstances and
    // DescribeInstanceAttribute): IMDSv2 required with one hop; a shutdown from inside
    // terminates the test instance, and only stops the builder (its volume is the image)
    let home = aws_sdk_ec2::Client::new(&admin);
    let instances = rt
        .block_on(home.describe_instances().send())
        .expect("DescribeInstances");
    let mut seen = BTreeMap::new();
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        let name = i
            .tags()
            .iter()
            .find(|t| t.key() == Some("Name"))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string();
        let kind = if name.starts_with("kiln-test-") {
            "test"
        } else if name.starts_with("kiln-builder-") {
            "builder"
        } else {
            continue;
        };
        let m = i.metadata_options().expect("metadata options");
        assert_eq!(
            m.http_tokens().map(|t| t.as_str()),
            Some("required"),
            "{kind}"
        );
        assert_eq!(m.http_put_response_hop_limit(), Some(1), "{kind}");
        // in kiln's own security group (the pipeline names none), which lets nothing in, and
        // without a public address
        let groups: BTreeSet<&str> = i
            .network_interfaces()
            .iter()
            .flat_map(|n| n.groups())
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(groups.len(), 1, "{kind}: {groups:?}");
        assert_eq!(i.public_ip_address(), None, "{kind}");
        let described = rt
            .block_on(
                home.describe_security_groups()
                    .group_ids(groups.iter().next().copied().unwrap_or_default())
                    .send(),
            )
            .expect("DescribeSecurityGroups");
        assert_eq!(
            described.security_groups()[0].group_name(),
            Some(format!("kiln-{STACK}").as_str()),
            "{kind}"
        );
        let group = &described.security_groups()[0];
        assert!(
            group.ip_permissions().is_empty(),
            "{kind}: inbound {:?}",
            group.ip_permissions()
        );
        assert!(
            group
                .tags()
                .iter()
                .any(|t| t.key() == Some("kiln:stack") && t.value() == Some(STACK)),
            "{kind}: the group carries the stack tag"
        );
        let behaviour = rt
            .block_on(
                home.describe_instance_attribute()
                    .instance_id(i.instance_id().unwrap_or_default())
                    .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
                    .send(),
            )
            .expect("DescribeInstanceAttribute");
        let value = behaviour
            .instance_initiated_shutdown_behavior()
            .and_then(|v| v.value())
            .unwrap_or_default()
            .to_string();
        seen.insert(kind, value);
    }
    assert_eq!(
        seen,
        BTreeMap::from([
            ("builder", "stop".to_string()),
            ("test", "terminate".to_string())
        ])
    );
    // AND both got the stack's instance profile (the pipeline names none), so the SSM agent can
    // register: each RunInstances passed the stack's builder role to EC2 (moto does not report
    // the profile back; the authorized requests show it)
    let passed: BTreeSet<String> = r
        .decisions()
        .iter()
        .filter(|d| d["action"] == "iam:PassRole" && d["operation"] == "RunInstances")
        .filter(|d| {
            d["resource"]
                .as_str()
                .is_some_and(|a| a.contains(":role/kiln-BuilderRole-"))
        })
        .filter_map(|d| d["role"].as_str().map(str::to_string))
        .map(|role| role.split('-').nth(1).unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        passed,
        BTreeSet::from([
            "LaunchBuilderFunctionRole".to_string(),
            "TestImageFunctionRole".to_string()
        ])
    );
    // AND each region's image is shared with that region's account and published in its
    // parameter
    let store = r.store_ports(&rt);
    for (region, image, account) in [
        ("us-east-1", regions["us-east-1"], "111122223333"),
        ("eu-central-1", regions["eu-central-1"], "444455556666"),
    ] {
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&admin)
                .region(aws_sdk_ec2::config::Region::new(region))
                .build(),
        );
        let shared = rt
            .block_on(
                ec2.describe_image_attribute()
                    .image_id(image)
                    .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                    .send(),
            )
            .expect("DescribeImageAttribute");
        let accounts: Vec<&str> = shared
            .launch_permissions()
            .iter()
            .filter_map(|l| l.user_id())
            .collect();
        assert_eq!(accounts, [account], "{region}");
        let published = rt
            .block_on(
                store
                    .ports()
                    .parameters
                    .get(region, "/images/al2023-moto/latest"),
            )
            .expect("GetParameter");
        assert_eq!(published.as_deref(), Some(image), "{region}");
    }
    // AND the commands sent to the instances carry no pipeline value in their shell text
    let decisions = r.decisions();
    let sent = decisions
        .iter()
        .filter(|d| {
            d["action"] == "ssm:SendCommand"
                && d["resource"]
                    .as_str()
                    .is_some_and(|x| x.contains(":instance/"))
        })
        .count();
    assert_eq!(sent, 2, "one customize and one test command");
    let commands = rt
        .block_on(aws_sdk_ssm_list(&admin))
        .into_iter()
        .collect::<Vec<_>>();
    assert_eq!(commands.len(), 2, "{commands:?}");
    for text in &commands {
        assert!(text.contains("--parameters-file params.json"), "{text}");
        assert!(
            !text.contains("SshPort") && !text.contains("/tmp"),
            "values reach the agent as files:\n{text}"
        );
    }
    // AND every stage function made requests, each one evaluated
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
    let dir = tempfile::tempdir().expect("dir");
    let expanded: Json =
        serde_json::from_str(&std::fs::read_to_string(expand(dir.path())).expect("expanded"))
            .expect("json");
    let unused = granted_but_unused(&expanded, &r.decisions());
    eprintln!(
        "rehearsal: {evaluated} requests evaluated, 0 denied; by role {by_role:?}\ngranted but unused: {}",
        serde_json::to_string_pretty(&unused).unwrap_or_default()
    );
}

/// A fault at each stage, injected at moto for what moto cannot produce (capacity, a failed
/// command) or as an AWS error answer: each build ends FAILED naming the stage, leaves nothing
/// (raw DescribeInstances / DescribeImages / DescribeSnapshots in every region, unchanged from
/// before the build), and frees the lock — with every request of the clean-up authorized too.
#[test]
fn a_failure_at_every_stage_of_the_deployed_stack_leaves_nothing_and_frees_the_lock() {
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let admin = r.admin(&rt);
    let ports = r.store_ports(&rt);
    for (n, (stage, error, fault)) in [
        (
            "launch",
            "Kiln.Capacity",
            json!({"role": "LaunchBuilderFunctionRole", "operation": "RunInstances",
                   "error": {"status": 500, "code": "InsufficientInstanceCapacity",
                             "message": "We currently do not have sufficient t3.small capacity"}}),
        ),
        (
            "customize",
            "Kiln.ComponentFailed",
            json!({"role": "CustomizeFunctionRole", "operation": "AmazonSSM.GetCommandInvocation",
                   "commandStatus": "Failed"}),
        ),
        (
            "snapshot",
            "Kiln.Internal",
            json!({"role": "SnapshotFunctionRole", "operation": "CreateImage",
                   "error": {"status": 400, "code": "InvalidParameterValue",
                             "message": "injected: CreateImage refused"}}),
        ),
        (
            "test",
            "Kiln.TestFailed",
            json!({"role": "TestImageFunctionRole", "operation": "AmazonSSM.GetCommandInvocation",
                   "commandStatus": "Failed"}),
        ),
        (
            "distribute",
            "Kiln.Internal",
            json!({"role": "DistributeFunctionRole", "operation": "CopyImage", "region": "eu-central-1",
                   "error": {"status": 400, "code": "InvalidRequest",
                             "message": "injected: CopyImage refused"}}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // GIVEN what the account holds before the build, and the fault
        let before = inventory(&rt, &admin);
        r.inject(json!([fault]));
        // WHEN a build runs
        let name = format!("fault-{n}");
        let outcome = r.execute(&rt, "al2023-moto", &name);
        r.inject(json!([]));
        // THEN it failed with the stage's error, every request authorized
        assert_eq!(outcome.status, Status::Failed, "{stage}");
        assert_eq!(outcome.error.as_deref(), Some(error), "{stage}: {:?}", outcome.cause);
        r.assert_all_allowed();
        // AND the build is FAILED with the stage named
        let builds = rt
            .block_on(ports.ports().store.builds("al2023-moto"))
            .expect("builds");
        let b = builds
            .iter()
            .find(|b| b.request_id.as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{stage}: the build is recorded"));
        assert_eq!(b.status, kiln::model::build::BuildStatus::Failed, "{stage}");
        assert_eq!(b.failure.as_ref().map(|f| f.stage.as_str()), Some(stage), "{stage}");
        // AND nothing is left in any region: no instance running, no new image or snapshot
        let after = inventory(&rt, &admin);
        assert!(after.live_instances.is_empty(), "{stage}: {:?}", after.live_instances);
        assert_eq!(after.images, before.images, "{stage}: images left");
        assert_eq!(after.snapshots, before.snapshots, "{stage}: snapshots left");
        // AND the lock is free
        r.assert_lock_free(&rt, "al2023-moto", stage);
    }
}

/// A parent parameter pointing at an AMI that does not exist: moto would launch it anyway (AWS
/// fails later, with a worse message). The deployed LaunchBuilder describes the parent first:
/// the build ends FAILED naming the AMI, nothing is launched, every request is authorized.
#[test]
fn a_parent_that_does_not_exist_fails_the_deployed_build_before_anything_launches() {
    let r = Rehearsal::deploy();
    let rt = runtime();
    let admin = r.admin(&rt);
    let param = "/images/base/missing";
    let missing = "ami-0123456789abcdef0";
    rt.block_on(
        aws_sdk_ssm::Client::new(&admin)
            .put_parameter()
            .name(param)
            .value(missing)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send(),
    )
    .expect("PutParameter");
    r.apply(&moto_pipeline().replace(
        "ssmParameter: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        &format!("ssmParameter: {param}"),
    ));
    let before = inventory(&rt, &admin);
    let outcome = r.execute(&rt, "al2023-moto", "missing-parent");
    assert_eq!(
        outcome.error.as_deref(),
        Some("Kiln.InvalidPipeline"),
        "{:?}",
        outcome.cause
    );
    r.assert_all_allowed();
    let ports = r.store_ports(&rt);
    let b = rt
        .block_on(ports.ports().store.builds("al2023-moto"))
        .expect("builds")
        .into_iter()
        .find(|b| b.request_id.as_deref() == Some("missing-parent"))
        .expect("the build is recorded");
    assert_eq!(b.status, kiln::model::build::BuildStatus::Failed);
    let failure = b.failure.expect("failure");
    assert_eq!(failure.stage, "launch");
    assert!(
        failure.message.contains(missing) && failure.message.contains("does not exist"),
        "{failure:?}"
    );
    // Nothing launched: the raw inventory of every region is what it was.
    let after = inventory(&rt, &admin);
    assert!(
        after.live_instances.is_empty(),
        "{:?}",
        after.live_instances
    );
    assert_eq!(after.images, before.images);
    let launched = rt
        .block_on(aws_sdk_ec2::Client::new(&admin).describe_instances().send())
        .expect("DescribeInstances")
        .reservations()
        .iter()
        .flat_map(|res| res.instances())
        .filter(|i| {
            i.tags()
                .iter()
                .any(|t| t.key() == Some("kiln:build-id") && t.value() == Some(b.id.as_str()))
        })
        .count();
    assert_eq!(launched, 0, "an instance was launched for the build");
    r.assert_lock_free(&rt, "al2023-moto", "missing parent");
}

/// A public AMI published as the account's own parent parameter `name` (by the administrator).
pub(crate) fn publish_parent(r: &Rehearsal, rt: &tokio::runtime::Runtime, name: &str) -> String {
    let ports = r.store_ports(rt);
    rt.block_on(crate::aws::publish_public_ami(&ports.ports(), name))
        .0
}

/// The stack's daily lifecycle run: the cleanup function's bootstrap invoked with the input of
/// the deployed schedule, under its own role. Old images go in every region with their
/// snapshots; the newest and the image tagged to be kept stay (raw DescribeImages and
/// DescribeSnapshots).
#[test]
fn the_daily_lifecycle_run_of_the_deployed_stack_removes_old_images_in_every_region() {
    // GIVEN a pipeline that keeps one image, built three times through the deployed stack
    let r = Rehearsal::deploy();
    let rt = runtime();
    // (moto's own public images come with snapshots in the account: counted before, left out)
    let before = inventory(&rt, &r.admin(&rt));
    r.apply(
        &(moto_pipeline()
            + "schedule:\n  startCondition: always\nlifecycle:\n  keepLatest: 1\n  excludeTags:\n    keep: \"true\"\n"),
    );
    let images: Vec<BTreeMap<String, String>> = (0..3)
        .map(|n| {
            let out = r.execute(&rt, "al2023-moto", &format!("lc-{n}"));
            assert_eq!(
                out.status,
                Status::Succeeded,
                "{:?} {:?}",
                out.error,
                out.cause
            );
            out.output.expect("output")["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        e["region"].as_str().unwrap_or_default().to_string(),
                        e["image"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .collect();
    // AND the oldest image in eu-central-1 tagged by its owner to be kept
    let admin = r.admin(&rt);
    let eu = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&admin)
            .region(aws_sdk_ec2::config::Region::new("eu-central-1"))
            .build(),
    );
    let keep = images[0]["eu-central-1"].clone();
    rt.block_on(
        eu.create_tags()
            .resources(&keep)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("keep")
                    .value("true")
                    .build(),
            )
            .send(),
    )
    .expect("tag");
    // WHEN the daily schedule fires: its target is the cleanup function, with its input
    let schedule = rt
        .block_on(
            aws_sdk_scheduler::Client::new(&admin)
                .get_schedule()
                .name(format!("{STACK}-daily-lifecycle"))
                .send(),
        )
        .expect("the daily schedule");
    let target = schedule.target().expect("target");
    assert_eq!(schedule.schedule_expression(), Some("rate(1 day)"));
    assert!(
        target.arn().contains("-CleanupFunction-"),
        "{}",
        target.arn()
    );
    let input: Json = serde_json::from_str(target.input().unwrap_or("{}")).expect("input");
    let (ok, report) = r.invoke("CleanupFunction", input);
    // THEN it removed the two old images in us-east-1 and the middle one in eu-central-1
    assert!(ok, "{report}");
    assert_eq!(report["failed"], json!([]), "{report}");
    r.assert_all_allowed();
    let inv = inventory(&rt, &admin);
    let want: BTreeSet<String> = [
        format!("us-east-1/{}", images[2]["us-east-1"]),
        format!("eu-central-1/{}", images[2]["eu-central-1"]),
        format!("eu-central-1/{keep}"),
    ]
    .into_iter()
    .collect();
    let new_images: BTreeSet<String> = inv.images.difference(&before.images).cloned().collect();
    assert_eq!(new_images, want, "{report}");
    // AND their snapshots: one per image left, the others deleted
    let new_snapshots: Vec<&String> = inv.snapshots.difference(&before.snapshots).collect();
    assert_eq!(new_snapshots.len(), 3, "{new_snapshots:?}");
}

/// The failure policy on the deployed stack: after the failures it allows, the cleanup function
/// disables the pipeline's real schedule (EventBridge Scheduler) and parent-change rule.
#[test]
fn the_failure_policy_disables_the_deployed_schedule_and_rule() {
    // GIVEN a pipeline on the account's own parent parameter, scheduled, disabled after 1 failure
    let r = Rehearsal::deploy();
    let rt = runtime();
    let param = "/images/base/latest";
    publish_parent(&r, &rt, param);
    r.apply(
        &(moto_pipeline().replace(
            "ssmParameter: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            &format!("ssmParameter: {param}"),
        ) + "schedule:\n  cron: cron(0 3 ? * MON *)\n  disableAfterFailures: 1\n"),
    );
    let admin = r.admin(&rt);
    let scheduler = aws_sdk_scheduler::Client::new(&admin);
    let events = aws_sdk_eventbridge::Client::new(&admin);
    let state = |rt: &tokio::runtime::Runtime| {
        let s = rt
            .block_on(scheduler.get_schedule().name("kiln-al2023-moto").send())
            .expect("schedule");
        let rule = rt
            .block_on(
                events
                    .describe_rule()
                    .name("kiln-al2023-moto-parent")
                    .send(),
            )
            .expect("rule");
        (
            s.state().map(|x| x.as_str().to_string()),
            rule.state().map(|x| x.as_str().to_string()),
        )
    };
    assert_eq!(state(&rt), (Some("ENABLED".into()), Some("ENABLED".into())));
    // WHEN a scheduled build fails (its component's command fails)
    r.inject(json!([{"role": "CustomizeFunctionRole",
                     "operation": "AmazonSSM.GetCommandInvocation", "commandStatus": "Failed"}]));
    let out = r.execute_scheduled(&rt, "al2023-moto", "policy-1");
    assert_eq!(
        out.error.as_deref(),
        Some("Kiln.ComponentFailed"),
        "{:?}",
        out.cause
    );
    // THEN the schedule and the rule are disabled, every request authorized
    r.assert_all_allowed();
    assert_eq!(
        state(&rt),
        (Some("DISABLED".into()), Some("DISABLED".into()))
    );
}

/// Hostile: an instance and an image someone else tagged with a real build's id (but not by
/// this stack) are neither found nor touched by the clean-up of that build; the build's own
/// builder is terminated, the build ends FAILED, the lock is free, and nothing was denied.
#[test]
fn a_forged_build_tag_cannot_make_the_stack_touch_someone_elses_resources() {
    // GIVEN a build whose builder the deployed LaunchBuilder function launched
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let (ok, launched) = r.invoke(
        "LaunchBuilderFunction",
        json!({"op": "start", "request": {"pipeline": "al2023-moto",
               "trigger": {"kind": "manual"}, "requestId": "forged-1"}}),
    );
    assert!(ok, "{launched}");
    let build_id = launched["id"].as_str().expect("id").to_string();
    let builder = launched["builder"]["id"]
        .as_str()
        .expect("builder")
        .to_string();
    // AND someone else's instance and image carrying that build's id, pipeline and version
    let admin = r.admin(&rt);
    let ec2 = aws_sdk_ec2::Client::new(&admin);
    let tags = |kind: aws_sdk_ec2::types::ResourceType| {
        let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
        aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(kind)
            .tags(tag("kiln:build-id", &build_id))
            .tags(tag("kiln:pipeline", "al2023-moto"))
            .tags(tag("kiln:version", "2.1.0/1"))
            .build()
    };
    let parent = launched["parentImage"]
        .as_str()
        .expect("parent")
        .to_string();
    let forged = rt
        .block_on(
            ec2.run_instances()
                .image_id(&parent)
                .min_count(1)
                .max_count(1)
                .tag_specifications(tags(aws_sdk_ec2::types::ResourceType::Instance))
                .send(),
        )
        .expect("RunInstances")
        .instances()[0]
        .instance_id()
        .expect("id")
        .to_string();
    let forged_image = rt
        .block_on(
            ec2.create_image()
                .instance_id(&forged)
                .name("not-kiln")
                .tag_specifications(tags(aws_sdk_ec2::types::ResourceType::Image))
                .send(),
        )
        .expect("CreateImage")
        .image_id()
        .expect("id")
        .to_string();
    // WHEN the build fails and the deployed Cleanup function runs with the state machine's input
    let (ok, done) = r.invoke(
        "CleanupFunction",
        json!({"build": launched, "error": {"Error": "Kiln.Internal", "Cause": "injected"}}),
    );
    // THEN the clean-up succeeded without a single denied request
    assert!(ok, "{done}");
    r.assert_all_allowed();
    assert_eq!(done["status"], "FAILED", "{done}");
    // AND the build's builder is terminated, the forged instance and image are untouched
    let state = |id: &str| {
        rt.block_on(ec2.describe_instances().instance_ids(id).send())
            .expect("DescribeInstances")
            .reservations()[0]
            .instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
    };
    assert_eq!(state(&builder).as_deref(), Some("terminated"));
    assert_eq!(state(&forged).as_deref(), Some("running"));
    let images = rt
        .block_on(ec2.describe_images().image_ids(&forged_image).send())
        .expect("DescribeImages");
    assert_eq!(images.images().len(), 1, "the forged image is still there");
    // AND the lock is free
    r.assert_lock_free(&rt, "al2023-moto", "after the forged build");
}

/// Retries as Lambda delivers them: every Task of the deployed definition invoked twice with
/// its original input does its work once — one builder, one test instance, one image per
/// region, one command per stage — and the build is AVAILABLE.
#[test]
fn every_task_delivered_twice_with_its_original_input_does_its_work_once() {
    // GIVEN the deployed stack and its pipeline, and what the account holds before
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let admin = r.admin(&rt);
    let before = inventory(&rt, &admin);
    // WHEN a build runs with every Task delivered twice
    let twice = Chaos {
        inner: Bootstraps(r.functions.clone(), None),
        twice: true,
        crash_at: None,
        calls: Default::default(),
        stop_at: None,
        stopped: Default::default(),
    };
    let outcome = r.execute_with(&rt, Arc::new(twice), "al2023-moto", "twice-1");
    // THEN it is AVAILABLE, every request authorized
    r.assert_all_allowed();
    assert_eq!(
        outcome.status,
        Status::Succeeded,
        "{:?} {:?}",
        outcome.error,
        outcome.cause
    );
    // AND exactly two instances were ever launched (the builder and the test instance), one
    // image made per region, and one command sent per command stage
    let mut launched = 0;
    for region in REGIONS {
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::config::Builder::from(&admin)
                .region(aws_sdk_ec2::config::Region::new(region))
                .build(),
        );
        launched += rt
            .block_on(
                ec2.describe_instances()
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("tag:kiln:stack")
                            .values(STACK)
                            .build(),
                    )
                    .send(),
            )
            .expect("DescribeInstances")
            .reservations()
            .iter()
            .map(|res| res.instances().len())
            .sum::<usize>();
    }
    assert_eq!(launched, 2, "instances launched");
    let after = inventory(&rt, &admin);
    let new_images: Vec<&String> = after.images.difference(&before.images).collect();
    assert_eq!(new_images.len(), 2, "one image per region: {new_images:?}");
    assert!(
        after.live_instances.is_empty(),
        "{:?}",
        after.live_instances
    );
    let commands = rt.block_on(aws_sdk_ssm_list(&admin));
    assert_eq!(commands.len(), 2, "one customize and one test command");
}

/// Concurrency for real: 20 deliveries of a start for one pipeline at once, each the deployed
/// LaunchBuilder bootstrap in its own process with its own client, against DynamoDB (moto):
/// exactly one build and one builder; every other start is told the pipeline is locked and by
/// which build; nothing is recorded twice.
#[test]
fn twenty_concurrent_starts_on_dynamodb_make_one_build_and_name_the_holder() {
    // GIVEN the deployed stack and its pipeline
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    // WHEN 20 executions start it at the same moment
    let answers: Vec<(bool, Json)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|n| {
                let r = &r;
                s.spawn(move || {
                    r.invoke(
                        "LaunchBuilderFunction",
                        json!({"op": "start", "request": {"pipeline": "al2023-moto",
                               "trigger": {"kind": "manual"}, "requestId": format!("race-{n}")}}),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    // THEN exactly one started a build; every other was refused as locked, naming that build
    let started: Vec<&Json> = answers
        .iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(started.len(), 1, "{answers:?}");
    let holder = started[0]["id"].as_str().expect("id");
    for (ok, body) in &answers {
        if *ok {
            continue;
        }
        assert_eq!(body["errorType"], "Kiln.Locked", "{body}");
        assert!(
            body["errorMessage"]
                .as_str()
                .unwrap_or_default()
                .contains(holder),
            "the refusal names the holder {holder}: {body}"
        );
    }
    r.assert_all_allowed();
    // AND one build is recorded, and one builder runs
    let ports = r.store_ports(&rt);
    let builds = rt
        .block_on(ports.ports().store.builds("al2023-moto"))
        .expect("builds");
    assert_eq!(builds.len(), 1, "{builds:?}");
    let inv = inventory(&rt, &r.admin(&rt));
    assert_eq!(inv.live_instances.len(), 1, "{:?}", inv.live_instances);
}

/// The fault campaign's Task delivery: the deployed bootstraps, optionally every Task delivered
/// twice, optionally the n-th invocation crashing after its work (its answer lost, Lambda
/// reports a service error, the state machine retries it with the original input).
struct Chaos {
    inner: Bootstraps,
    twice: bool,
    crash_at: Option<usize>,
    calls: std::sync::atomic::AtomicUsize,
    /// The execution is stopped (as StopExecution stops it) before this Task call: the call
    /// never returns and `stopped` is told.
    stop_at: Option<usize>,
    stopped: Arc<tokio::sync::Notify>,
}

impl Tasks for Chaos {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.stop_at == Some(n) {
                self.stopped.notify_one();
                futures::future::pending::<()>().await;
            }
            let first = self.inner.invoke(resource, state, input.clone()).await;
            if self.crash_at == Some(n) {
                return Err(StateError::new(
                    "Lambda.ServiceException",
                    "the function crashed after its AWS calls (injected)",
                ));
            }
            if !self.twice {
                return first;
            }
            // Delivered again after the first's side effects; the retry's answer counts.
            let second = self.inner.invoke(resource, state, input).await;
            match (&first, second) {
                (Ok(_), Err(e)) => Err(StateError::new(
                    "Rehearsal.RetryFailed",
                    format!(
                        "{state}: the first delivery succeeded, the retry failed: {}",
                        e.cause
                    ),
                )),
                (_, second) => second,
            }
        })
    }
}

/// The fault campaign (`make chaos` raises the count): seeded random builds through the deployed
/// stack, each with one fault — none, no capacity, a throttled call (transient), a failed
/// customize or test command, a failed CreateImage, a failed copy in one region, a function that
/// crashes after its AWS calls and is retried with its original input, every Task delivered
/// twice. After each build: its final status and stage as the fault predicts, no instance
/// running, no image or snapshot but the build's own (and none after a failure) by raw
/// Describe* in every region, never more instances launched than the build needs, the lock
/// free, and no request denied.
#[test]
fn fault_campaign_on_the_deployed_stack_leaves_nothing_behind() {
    let builds: usize = std::env::var("KILN_CHAOS_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261201);
    // A fresh deployment every `segment` builds: moto keeps every terminated instance and every
    // image, so one account of 1000 builds would time moto's listings, not kiln.
    let segment: usize = std::env::var("KILN_CHAOS_SEGMENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .max(1);
    let rt = runtime();
    let deploy = || {
        let r = Rehearsal::deploy();
        r.apply(&(moto_pipeline() + "schedule:\n  startCondition: always\n"));
        r
    };
    let mut r = deploy();
    let mut admin = r.admin(&rt);
    let mut ports = r.store_ports(&rt);
    let mut evaluated = 0usize;
    let mut deployments = 1usize;
    let started = std::time::Instant::now();
    let mut rng = Lcg(seed);
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut leftovers = 0usize;
    let kinds = [
        "none",
        "capacity",
        "throttled",
        "customize-failed",
        "test-failed",
        "create-image-failed",
        "copy-failed",
        "crash-after-call",
        "delivered-twice",
        "image-failed",
        "cancelled",
    ];
    // What the account holds before each build: what it held after the one before.
    let mut before = inventory(&rt, &admin);
    for n in 0..builds {
        if n > 0 && n % segment == 0 {
            evaluated += r.assert_all_allowed().0;
            drop(r);
            r = deploy();
            admin = r.admin(&rt);
            ports = r.store_ports(&rt);
            before = inventory(&rt, &admin);
            deployments += 1;
        }
        if n > 0 && n % 50 == 0 {
            eprintln!(
                "fault campaign: {n} builds in {:.0} s, faults {by_kind:?}, leftovers {leftovers}",
                started.elapsed().as_secs_f64()
            );
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        *by_kind.entry(kind).or_default() += 1;
        let id = format!("chaos-{seed}-{n}");
        let throttled_op = ["RunInstances", "CreateImage", "CopyImage"][rng.below(3) as usize];
        let (faults, expect): (Json, Option<(&str, &str)>) = match kind {
            "capacity" => (
                json!([{"id": id, "role": "LaunchBuilderFunctionRole", "operation": "RunInstances",
                        "error": {"status": 500, "code": "InsufficientInstanceCapacity", "message": "injected"}}]),
                Some(("launch", "Kiln.Capacity")),
            ),
            "throttled" => (
                json!([{"id": id, "operation": throttled_op, "count": 1,
                        "error": {"status": 400, "code": "RequestLimitExceeded", "message": "injected"}}]),
                None,
            ),
            "customize-failed" => (
                json!([{"id": id, "role": "CustomizeFunctionRole", "operation": "AmazonSSM.GetCommandInvocation", "commandStatus": "Failed"}]),
                Some(("customize", "Kiln.ComponentFailed")),
            ),
            "test-failed" => (
                json!([{"id": id, "role": "TestImageFunctionRole", "operation": "AmazonSSM.GetCommandInvocation", "commandStatus": "Failed"}]),
                Some(("test", "Kiln.TestFailed")),
            ),
            "create-image-failed" => (
                json!([{"id": id, "role": "SnapshotFunctionRole", "operation": "CreateImage",
                        "error": {"status": 400, "code": "InvalidParameterValue", "message": "injected"}}]),
                Some(("snapshot", "Kiln.Internal")),
            ),
            "image-failed" => (
                json!([{"id": id, "role": "SnapshotFunctionRole", "operation": "DescribeImages", "imageState": "failed"}]),
                Some(("snapshot", "Kiln.Internal")),
            ),
            "copy-failed" => (
                json!([{"id": id, "role": "DistributeFunctionRole", "operation": "CopyImage", "region": "eu-central-1",
                        "error": {"status": 400, "code": "InvalidRequest", "message": "injected"}}]),
                Some(("distribute", "Kiln.Internal")),
            ),
            _ => (json!([]), None),
        };
        // GIVEN the fault
        r.inject(faults);
        let stopped = Arc::new(tokio::sync::Notify::new());
        let stop_at = (kind == "cancelled").then(|| rng.below(14) as usize);
        let tasks = Chaos {
            inner: Bootstraps(r.functions.clone(), None),
            twice: kind == "delivered-twice",
            crash_at: (kind == "crash-after-call").then(|| rng.below(12) as usize),
            calls: Default::default(),
            stop_at,
            stopped: stopped.clone(),
        };
        // WHEN the build runs (and, cancelled, is stopped between two states, then `kiln cancel
        // --stack` cleans up as a user would)
        let outcome = r.execute_until(&rt, Arc::new(tasks), "al2023-moto", &id, stopped);
        r.inject(json!([]));
        // THEN its end is what the fault predicts
        let find = || {
            rt.block_on(ports.ports().store.builds("al2023-moto"))
                .expect("builds")
                .into_iter()
                .find(|b| b.request_id.as_deref() == Some(id.as_str()))
        };
        let mut available = expect.is_none();
        match outcome {
            None => {
                let what = format!("build {n} (cancelled at call {:?})", stop_at);
                // Stopped before the start recorded a build: nothing to cancel, nothing made.
                if let Some(b) = find() {
                    let (code, out, err) = r.kiln(&["cancel", b.id.as_str(), "--stack", "kiln"]);
                    let stored = find().expect("the build");
                    if b.status.is_final() {
                        // Stopped after its last state: `kiln cancel` says it is over already.
                        assert_eq!(code, 2, "{what}: {out}{err}");
                        available = b.status == kiln::model::build::BuildStatus::Available;
                    } else {
                        assert_eq!(code, 0, "{what}: kiln cancel: {out}{err}");
                        assert_eq!(
                            stored.status,
                            kiln::model::build::BuildStatus::Cancelled,
                            "{what}"
                        );
                        eprintln!(
                            "{what}: {} → CANCELLED by kiln cancel --stack",
                            b.status.as_str()
                        );
                        available = false;
                    }
                } else {
                    available = false;
                }
            }
            Some(outcome) => {
                let what = format!(
                    "build {n} ({kind}): {:?} {:?}",
                    outcome.error, outcome.cause
                );
                let stored = find().unwrap_or_else(|| panic!("{what}: no build recorded"));
                match expect {
                    None => {
                        assert_eq!(outcome.status, Status::Succeeded, "{what}");
                        assert_eq!(
                            stored.status,
                            kiln::model::build::BuildStatus::Available,
                            "{what}"
                        );
                    }
                    Some((stage, error)) => {
                        assert_eq!(outcome.error.as_deref(), Some(error), "{what}");
                        assert_eq!(
                            stored.status,
                            kiln::model::build::BuildStatus::Failed,
                            "{what}"
                        );
                        assert_eq!(
                            stored.failure.as_ref().map(|f| f.stage.as_str()),
                            Some(stage),
                            "{what}"
                        );
                    }
                }
            }
        }
        let what = format!("build {n} ({kind})");
        // AND nothing is left: no instance runs, images and snapshots only of an AVAILABLE build
        let after = inventory(&rt, &admin);
        let new_images = after.images.difference(&before.images).count();
        let new_snapshots = after.snapshots.difference(&before.snapshots).count();
        let want = if available { 2 } else { 0 };
        let left =
            after.live_instances.len() + new_images.abs_diff(want) + new_snapshots.abs_diff(want);
        leftovers += left;
        assert_eq!(
            left, 0,
            "{what}: instances {:?}, {new_images} new images, {new_snapshots} new snapshots",
            after.live_instances
        );
        before = after;
        // AND never more than a builder and a test instance were launched for it
        let build_id = find().map(|b| b.id.0).unwrap_or_default();
        let launched: usize = rt
            .block_on(
                aws_sdk_ec2::Client::new(&admin)
                    .describe_instances()
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("tag:kiln:build-id")
                            .values(build_id.as_str())
                            .build(),
                    )
                    .send(),
            )
            .expect("DescribeInstances")
            .reservations()
            .iter()
            .map(|res| res.instances().len())
            .sum();
        assert!(launched <= 2, "{what}: {launched} instances launched");
        // AND the lock is free
        r.assert_lock_free(&rt, "al2023-moto", &what);
    }
    evaluated += r.assert_all_allowed().0;
    let report = json!({"seed": seed, "builds": builds, "faults": by_kind, "leftovers": leftovers,
                        "deployments": deployments, "seconds": started.elapsed().as_secs(),
                        "requestsEvaluated": evaluated, "denied": 0});
    eprintln!("fault campaign: {report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-campaign.json"),
        report.to_string(),
    );
}

/// A wait ended by its event, through the deployed stack: the snapshot's image is pending when
/// the check and the wake function look, so the SnapshotAwait task's token is kept in the table;
/// the "EC2 AMI State Change" event AWS sends matches the deployed rule (by moto's EventBridge
/// pattern matcher), the rule's target — the wake function's bootstrap, under its role —
/// answers the token with SendTaskSuccess, and the execution goes on at once, not after
/// waitSeconds. A forged event (a state the wait does not end in, for a resource no token
/// awaits) wakes nothing. Every request is authorized.
#[test]
fn a_wait_ends_by_its_event_through_the_deployed_rule_and_the_wake_function() {
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let admin = r.admin(&rt);
    // GIVEN the image pending when the wake function looks (moto's are available at once)
    r.inject(
        json!([{"role": "WakeFunctionRole", "operation": "DescribeImages",
                     "imageState": "pending", "count": 1}]),
    );
    let events = aws_sdk_eventbridge::Client::new(&admin);
    let rules = rt
        .block_on(events.list_rules().send())
        .expect("ListRules")
        .rules()
        .to_vec();
    let image_rule = rules
        .iter()
        .find(|rule| rule.name().unwrap_or_default().contains("ImageState"))
        .unwrap_or_else(|| panic!("the deployed rules: {rules:?}"))
        .clone();
    let target = rt
        .block_on(
            events
                .list_targets_by_rule()
                .rule(image_rule.name().unwrap_or_default())
                .send(),
        )
        .expect("ListTargetsByRule")
        .targets()[0]
        .arn()
        .to_string();
    let wake = r
        .functions
        .get(&target)
        .cloned()
        .expect("the rule's target is a deployed function");
    assert_eq!(wake.binary, "wake");
    // AND a watcher that, once a token is kept, sends what EventBridge would deliver
    let table = r.outputs["TableName"].clone();
    let dynamodb = aws_sdk_dynamodb::Client::new(&admin);
    let pattern = image_rule.event_pattern().unwrap_or_default().to_string();
    let delivered = std::thread::spawn(move || {
        let rt = runtime();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            let items = rt
                .block_on(dynamodb.scan().table_name(&table).send())
                .expect("Scan")
                .items()
                .to_vec();
            let kept = items.iter().find_map(|i| match i.get("pk") {
                Some(AttributeValue::S(pk)) if pk.starts_with("WAKE#") => Some(pk.clone()),
                _ => None,
            });
            if let Some(pk) = kept {
                let image = pk.rsplit('#').next().unwrap_or_default().to_string();
                let event = |state: &str, id: &str| {
                    json!({"version": "0", "id": "7f2b1d9e-0000-4000-8000-000000000001",
                        "detail-type": "EC2 AMI State Change", "source": "aws.ec2",
                        "account": "123456789012", "time": "2026-12-02T00:00:00Z",
                        "region": "us-east-1", "resources": [format!("arn:aws:ec2:us-east-1::image/{id}")],
                        "detail": {"RequestId": "r-1", "ImageId": id, "State": state, "ErrorMessage": ""}})
                };
                // By moto's EventBridge matcher (its TestEventPattern answers nothing).
                let matches = |e: &Json| {
                    let mut cmd = Command::new(python());
                    cmd.arg(repo().join("tests/rehearsal/events.py")).args([
                        "match",
                        &pattern,
                        &e.to_string(),
                    ]);
                    run_ok(cmd).trim() == "true"
                };
                let real = event("available", &image);
                // The rule lets through what ends a wait, and only that.
                assert!(matches(&real), "the deployed rule {pattern} matches {real}");
                assert!(
                    !matches(&event("pending", &image)),
                    "pending is filtered out"
                );
                let invoke = |e: &Json| {
                    let env: Vec<(&str, String)> = wake
                        .env
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.clone()))
                        .collect();
                    let answer = kiln_tests::runtime_api::invoke_once(
                        &wake.path,
                        &wake.function_name,
                        e,
                        &env,
                    )
                    .expect("the wake bootstrap runs")
                    .answer;
                    assert!(answer.0.ends_with("/response"), "{answer:?}");
                    answer.1
                };
                // A forged event for an image no token awaits wakes nothing.
                let forged = invoke(&event("available", "ami-0forged000000000"));
                let woken = invoke(&real);
                return (forged, woken);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no task token was kept within 120 s");
    });
    // WHEN a build runs with 60-second waits
    let machine = definition::parse(&r.definition).expect("the deployed definition parses");
    let engine = Engine::new(
        Arc::new(Bootstraps(r.functions.clone(), None)),
        Arc::new(VirtualClock::default()),
        true,
    )
    .with_tokens(r.tokens.clone());
    let input =
        json!({"pipeline": "al2023-moto", "trigger": {"kind": "manual"}, "waitSeconds": 60});
    let outcome = rt.block_on(engine.run(&machine, input, "woken-1"));
    r.inject(json!([]));
    let (forged, woken) = delivered.join().expect("the event was delivered");
    // THEN the build is AVAILABLE, the event's delivery woke one token, the forged one none
    assert_eq!(outcome.status, Status::Succeeded, "{:?}", outcome.cause);
    assert_eq!(woken["woken"], 1, "{woken}");
    assert_eq!(forged["woken"], 0, "{forged}");
    // AND the snapshot's wait ended by the event, not by its 60-second timeout
    let await_ends: Vec<&Json> = outcome
        .history
        .iter()
        .filter(|e| e.state.as_deref() == Some("SnapshotAwait"))
        .map(|e| &e.details)
        .collect();
    let kinds: Vec<&str> = outcome
        .history
        .iter()
        .filter(|e| e.state.as_deref() == Some("SnapshotAwait"))
        .map(|e| e.kind.as_str())
        .collect();
    assert!(kinds.contains(&"TaskSubmitted"), "{kinds:?}");
    assert!(
        kinds.contains(&"TaskSucceeded") && !kinds.contains(&"TaskTimedOut"),
        "{kinds:?}"
    );
    assert!(
        await_ends
            .iter()
            .any(|d| d["output"] == json!({"state": "available", "by": "event"})),
        "{await_ends:?}"
    );
    // (in the engine's virtual time, which a loaded machine does not stretch: each wait ended
    // before its 60-second timeout)
    let at = |e: &kiln::engine::Event| {
        chrono::DateTime::parse_from_rfc3339(&e.timestamp).expect("an RFC 3339 timestamp")
    };
    let mut submitted = None;
    for e in outcome
        .history
        .iter()
        .filter(|e| e.state.as_deref() == Some("SnapshotAwait"))
    {
        match e.kind.as_str() {
            "TaskSubmitted" => submitted = Some(at(e)),
            "TaskSucceeded" => {
                let waited = at(e) - submitted.expect("submitted before it succeeded");
                assert!(
                    waited < chrono::Duration::seconds(60),
                    "the snapshot's wait lasted {waited} of virtual time"
                );
            }
            _ => {}
        }
    }
    // AND every request — the watch, the event's answer — was authorized
    let (_, by_role) = r.assert_all_allowed();
    assert!(
        by_role.get("WakeFunctionRole").copied().unwrap_or(0) > 0,
        "{by_role:?}"
    );
    r.assert_lock_free(&rt, "al2023-moto", "after the woken build");
}

/// One request to a URL of the rehearsal's moto as a plain HTTP client sends it (curl, no AWS
/// SDK: only what the URL carries signs it), trusting the TLS listener's certificate only:
/// (status, body).
pub(crate) fn raw_http(r: &Rehearsal, method: &str, url: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert"])
        .arg(r.moto.certificate())
        .args([
            "-X",
            method,
            "-H",
            "Content-Type:",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ]);
    if method != "GET" {
        cmd.args(["--data-binary", "@-"]);
    }
    let mut child = cmd
        .arg(url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("body");
    let out = child.wait_with_output().expect("curl ends");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (answer, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), answer.to_string())
}

#[test]
fn a_request_signed_wrong_or_expired_is_refused_as_aws_refuses_it() {
    // GIVEN the deployed stack, an object in its bucket, and the customize function's own
    // credentials (its role's, as Lambda hands them over)
    let r = Rehearsal::deploy();
    let rt = runtime();
    let bucket = r.outputs["ArtifactsBucketName"].clone();
    let key = "builds/01JBPROBE/customize/report.json";
    let admin_s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&r.admin(&rt))
            .force_path_style(true)
            .build(),
    );
    rt.block_on(
        admin_s3
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(b"{}".to_vec().into())
            .send(),
    )
    .expect("put as the administrator");
    let f = r.function("CustomizeFunction");
    let env = |k: &str| {
        f.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} not in the function's environment"))
    };
    let as_customize = r.as_function(&rt, "CustomizeFunction");
    let s3_as = |secret: &str| {
        let creds = aws_sdk_s3::config::Credentials::new(
            env("AWS_ACCESS_KEY_ID"),
            secret,
            Some(env("AWS_SESSION_TOKEN")),
            None,
            "role",
        );
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&as_customize)
                .credentials_provider(creds)
                .force_path_style(true)
                .build(),
        )
    };
    let presigned = |secret: &str, start: std::time::SystemTime, life: u64| {
        let cfg = aws_sdk_s3::presigning::PresigningConfig::builder()
            .start_time(start)
            .expires_in(std::time::Duration::from_secs(life))
            .build()
            .expect("config");
        rt.block_on(
            s3_as(secret)
                .get_object()
                .bucket(&bucket)
                .key(key)
                .presigned(cfg),
        )
        .expect("presign")
        .uri()
        .to_string()
    };
    let secret = env("AWS_SECRET_ACCESS_KEY");
    let now = std::time::SystemTime::now();

    // WHEN the SDK signs for the role: THEN the request is let through (the verifier agrees with
    // the SDK's signer), in the headers and presigned
    rt.block_on(s3_as(&secret).get_object().bucket(&bucket).key(key).send())
        .expect("a header-signed GetObject of the role");
    // AND the same request over plain HTTP is refused by the bucket's TLS-only statement:
    // aws:SecureTransport is the scheme the request came by
    let plain = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&r.admin(&rt))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                env("AWS_ACCESS_KEY_ID"),
                secret.clone(),
                Some(env("AWS_SESSION_TOKEN")),
                None,
                "role",
            ))
            .force_path_style(true)
            .build(),
    );
    let refused = rt
        .block_on(plain.get_object().bucket(&bucket).key(key).send())
        .expect_err("the role's GetObject over plain HTTP");
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&refused),
        Some("AccessDenied"),
        "{refused:?}"
    );
    let line = r
        .decisions()
        .into_iter()
        .rev()
        .find(|d| d["action"] == "s3:GetObject")
        .expect("the evaluator's line for the plain GetObject");
    assert_eq!(line["result"], "ExplicitlyDenied", "{line}");
    let good = presigned(&secret, now, 600);
    let (status, answer) = raw_http(&r, "GET", &good, b"");
    assert_eq!(status, 200, "{answer}");

    // WHEN the signature is made with another secret, or the URL is altered after signing
    let e = rt
        .block_on(
            s3_as("not-the-roles-secret")
                .get_object()
                .bucket(&bucket)
                .key(key)
                .send(),
        )
        .expect_err("a request signed with the wrong secret was let through");
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&e),
        Some("SignatureDoesNotMatch"),
        "{e:?}"
    );
    let (status, answer) = raw_http(&r, "GET", &presigned("not-the-roles-secret", now, 600), b"");
    assert!(
        status == 403 && answer.contains("SignatureDoesNotMatch"),
        "{answer}"
    );
    let other = good.replace("customize/report.json", "test/report.json");
    let (status, answer) = raw_http(&r, "GET", &other, b"");
    assert!(
        status == 403 && answer.contains("SignatureDoesNotMatch"),
        "{answer}"
    );
    let (status, answer) = raw_http(&r, "PUT", &good, b"{\"forged\": true}");
    assert!(
        status == 403 && answer.contains("SignatureDoesNotMatch"),
        "{answer}"
    );

    // OR the URL has expired (signed two hours ago for one hour)
    let old = presigned(&secret, now - std::time::Duration::from_secs(7200), 3600);
    let (status, answer) = raw_http(&r, "GET", &old, b"");
    assert!(
        status == 403 && answer.contains("Request has expired"),
        "{answer}"
    );

    // THEN each refusal is in the log, and moto ran none of them: the object is as it was
    let refused: Vec<Json> = r
        .decisions()
        .into_iter()
        .filter(|d| d["result"] == "SignatureRefused")
        .collect();
    assert_eq!(refused.len(), 5, "{refused:#?}");
    let body = rt
        .block_on(async {
            let out = admin_s3
                .get_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(out.body.collect().await?.into_bytes())
        })
        .expect("the object");
    assert_eq!(&body[..], b"{}");
}

/// Task delivery that stops the execution when it reaches `state`, as "Stop execution" in the
/// console stops it between two states: that Task is never invoked, and `stopped` is told.
struct StopAt {
    inner: Bootstraps,
    state: &'static str,
    stopped: Arc<tokio::sync::Notify>,
}

impl Tasks for StopAt {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            if state == self.state {
                self.stopped.notify_one();
                futures::future::pending::<()>().await;
            }
            self.inner.invoke(resource, state, input).await
        })
    }
}

/// What EventBridge delivers to a rule's Lambda target when an execution's status changes: the
/// "Step Functions Execution Status Change" event as AWS documents it (Step Functions developer
/// guide, "EventBridge (CloudWatch Events) for Step Functions execution status changes"), no
/// input transformer.
fn execution_status_change(execution: &str, machine: &str, status: &str, input: &Json) -> Json {
    let name = execution.rsplit(':').next().unwrap_or_default();
    let stopped = if status == "RUNNING" {
        Json::Null
    } else {
        json!(1_796_677_341_576_u64)
    };
    json!({
        "version": "0",
        "id": "315c1398-40ff-a850-213b-158f73e60175",
        "detail-type": "Step Functions Execution Status Change",
        "source": "aws.states",
        "account": "123456789012",
        "time": "2026-12-07T21:42:21Z",
        "region": "us-east-1",
        "resources": [execution],
        "detail": {
            "executionArn": execution,
            "stateMachineArn": machine,
            "name": name,
            "status": status,
            "startDate": 1_796_677_014_968_u64,
            "stopDate": stopped,
            "input": input.to_string(),
            "inputDetails": {"included": true},
            "output": null,
            "outputDetails": null,
            "error": null,
            "cause": null
        }
    })
}

/// An instance's state by a raw DescribeInstances as the administrator.
fn instance_state(
    rt: &tokio::runtime::Runtime,
    admin: &aws_config::SdkConfig,
    instance: &str,
) -> String {
    rt.block_on(
        aws_sdk_ec2::Client::new(admin)
            .describe_instances()
            .instance_ids(instance)
            .send(),
    )
    .expect("DescribeInstances")
    .reservations()
    .iter()
    .flat_map(|r| r.instances())
    .filter_map(|i| i.state().and_then(|s| s.name()))
    .map(|n| n.as_str().to_string())
    .next()
    .unwrap_or_default()
}

impl Rehearsal {
    /// The build whose request id (execution name) is `id`, as the deployed table holds it.
    fn build_of(&self, rt: &tokio::runtime::Runtime, id: &str) -> kiln::model::build::Build {
        let ports = self.store_ports(rt);
        rt.block_on(ports.ports().store.builds("al2023-moto"))
            .expect("builds")
            .into_iter()
            .find(|b| b.request_id.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no build recorded for {id}"))
    }

    /// The build holding the pipeline's lock, by a raw GetItem of `PIPELINE#<name>` / `LOCK`.
    fn lock_holder(&self, rt: &tokio::runtime::Runtime, pipeline: &str) -> Option<String> {
        let ddb = aws_sdk_dynamodb::Client::new(&self.admin(rt));
        let item = rt
            .block_on(
                ddb.get_item()
                    .table_name(&self.outputs["TableName"])
                    .key("pk", AttributeValue::S(format!("PIPELINE#{pipeline}")))
                    .key("sk", AttributeValue::S("LOCK".into()))
                    .consistent_read(true)
                    .send(),
            )
            .expect("GetItem");
        item.item()
            .and_then(|i| i.get("build"))
            .and_then(|b| b.as_s().ok())
            .cloned()
    }

    /// An execution of the deployed state machine in moto's Step Functions, which keeps it
    /// RUNNING until it is stopped (kiln's engine runs the states): the record the reaper
    /// reads with DescribeExecution.
    fn start_recorded_execution(
        &self,
        rt: &tokio::runtime::Runtime,
        name: &str,
        input: &Json,
    ) -> String {
        let sfn = aws_sdk_sfn::Client::new(&self.admin(rt));
        rt.block_on(
            sfn.start_execution()
                .state_machine_arn(&self.outputs["StateMachineArn"])
                .name(name)
                .input(input.to_string())
                .send(),
        )
        .expect("StartExecution")
        .execution_arn()
        .to_string()
    }

    /// StopExecution as the administrator, as "Stop execution" in the console calls it.
    fn stop_recorded_execution(&self, rt: &tokio::runtime::Runtime, execution: &str) {
        let sfn = aws_sdk_sfn::Client::new(&self.admin(rt));
        rt.block_on(sfn.stop_execution().execution_arn(execution).send())
            .expect("StopExecution");
    }
}

/// The reaper, through the deployed stack: a build stopped mid-way as the console stops it
/// (StopExecution; Step Functions runs no Catch then) leaves its builder running and its lock
/// held until the "Step Functions Execution Status Change" event reaches the cleanup function
/// (under its own role, as the deployed rule's target), which asks DescribeExecution first: while
/// the execution RUNS, the same event cleans nothing (negative control); once it is ABORTED, the
/// builder is terminated (raw DescribeInstances), the build CANCELLED with the reason and the
/// lock free; the event delivered again changes nothing. The deployed rule's pattern lets that
/// event through (moto's EventBridge matcher), and not another state machine's or a running or
/// succeeded execution's; the function's permission lets EventBridge invoke it for that rule
/// only. Every request is authorized, DescribeExecution included.
#[test]
fn a_build_stopped_from_the_console_is_reaped_through_the_deployed_rule_once_it_has_stopped() {
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let admin = r.admin(&rt);
    let machine = r.outputs["StateMachineArn"].clone();
    let id = "console-stop-1";
    let input = json!({"pipeline": "al2023-moto", "trigger": {"kind": "manual"}, "waitSeconds": 1});
    // GIVEN a build started as the stack starts one, stopped mid-way with its builder running
    let execution = r.start_recorded_execution(&rt, id, &input);
    let stopped = Arc::new(tokio::sync::Notify::new());
    let tasks = StopAt {
        inner: Bootstraps(r.functions.clone(), None),
        state: "CustomizeCheck",
        stopped: stopped.clone(),
    };
    let outcome = r.execute_until(&rt, Arc::new(tasks), "al2023-moto", id, stopped);
    assert!(
        outcome.is_none(),
        "the execution ended by itself: {:?}",
        outcome.as_ref().map(|o| (&o.status, &o.cause))
    );
    let building = r.build_of(&rt, id);
    assert!(!building.status.is_final(), "{:?}", building.status);
    let builder = building.builder.as_ref().expect("a builder").id.0.clone();
    assert_eq!(instance_state(&rt, &admin, &builder), "running");
    let held = r.lock_holder(&rt, "al2023-moto");
    assert_eq!(held.as_deref(), Some(building.id.as_str()));
    let ended = execution_status_change(&execution, &machine, "ABORTED", &input);

    // WHEN the event arrives while Step Functions still says RUNNING (early, repeated, forged)
    let (ok, early) = r.invoke("CleanupFunction", ended.clone());
    // THEN nothing is cleaned
    assert!(ok, "{early}");
    assert_eq!(
        (&early["reaped"], &early["status"]),
        (&json!(false), &json!("RUNNING")),
        "{early}"
    );
    assert_eq!(instance_state(&rt, &admin, &builder), "running", "{early}");
    assert_eq!(r.build_of(&rt, id).status, building.status);
    assert_eq!(r.lock_holder(&rt, "al2023-moto"), held);

    // WHEN the execution is stopped as the console stops it, and its event is delivered
    r.stop_recorded_execution(&rt, &execution);
    let (ok, reaped) = r.invoke("CleanupFunction", ended.clone());
    // THEN the builder is terminated, the build CANCELLED with the reason, the lock free
    assert!(ok, "{reaped}");
    assert_eq!(reaped["reaped"], true, "{reaped}");
    assert_eq!(instance_state(&rt, &admin, &builder), "terminated");
    let cancelled = r.build_of(&rt, id);
    assert_eq!(cancelled.status, kiln::model::build::BuildStatus::Cancelled);
    let failure = cancelled.failure.clone().expect("the reason");
    assert_eq!(failure.error, "Kiln.Cancelled");
    assert!(
        failure
            .message
            .contains("the execution was stopped (ABORTED)"),
        "{}",
        failure.message
    );
    r.assert_lock_free(&rt, "al2023-moto", "after the reaper");

    // WHEN the same event is delivered again (EventBridge and Lambda retry deliveries)
    let (ok, again) = r.invoke("CleanupFunction", ended.clone());
    // THEN nothing more is done: the build record is as the first delivery left it
    assert!(ok, "{again}");
    assert_eq!(
        (&again["reaped"], &again["was"]),
        (&json!(false), &json!("CANCELLED")),
        "{again}"
    );
    assert_eq!(
        serde_json::to_value(r.build_of(&rt, id)).expect("JSON"),
        serde_json::to_value(&cancelled).expect("JSON")
    );
    r.assert_lock_free(&rt, "al2023-moto", "after the second delivery");

    // AND the deployed rule sends this event to the cleanup function, and only such events
    let events = aws_sdk_eventbridge::Client::new(&admin);
    let cleanup = r
        .functions
        .iter()
        .find(|(_, f)| f.binary == "cleanup")
        .map(|(arn, _)| arn.clone())
        .expect("the cleanup function");
    let rules = rt
        .block_on(events.list_rules().send())
        .expect("ListRules")
        .rules()
        .to_vec();
    let rule = rules
        .iter()
        .find(|rule| {
            rt.block_on(
                events
                    .list_targets_by_rule()
                    .rule(rule.name().unwrap_or_default())
                    .send(),
            )
            .expect("ListTargetsByRule")
            .targets()
            .iter()
            .any(|t| t.arn() == cleanup)
        })
        .unwrap_or_else(|| panic!("no deployed rule targets the cleanup function: {rules:?}"));
    let pattern = rule.event_pattern().unwrap_or_default().to_string();
    let matches = |e: &Json| {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/rehearsal/events.py"))
            .args(["match", &pattern, &e.to_string()]);
        run_ok(cmd).trim() == "true"
    };
    for status in ["ABORTED", "TIMED_OUT", "FAILED"] {
        let e = execution_status_change(&execution, &machine, status, &input);
        assert!(
            matches(&e),
            "the deployed rule {pattern} lets {status} through"
        );
    }
    for status in ["RUNNING", "SUCCEEDED"] {
        let e = execution_status_change(&execution, &machine, status, &input);
        assert!(
            !matches(&e),
            "the deployed rule {pattern} lets {status} through"
        );
    }
    let other_machine = machine.replace(":stateMachine:kiln-pipeline", ":stateMachine:other");
    let other = execution_status_change(
        &execution.replace(":kiln-pipeline:", ":other:"),
        &other_machine,
        "ABORTED",
        &input,
    );
    assert_ne!(other_machine, machine);
    assert!(
        !matches(&other),
        "the deployed rule {pattern} lets another state machine's execution through"
    );
    // AND EventBridge may invoke the cleanup function for that rule only
    let rule_arn = rule.arn().unwrap_or_default().to_string();
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import boto3, sys; print(boto3.client('lambda', region_name='us-east-1')\
         .get_policy(FunctionName=sys.argv[1])['Policy'])",
        &cleanup,
    ])
    .envs(r.moto.env());
    let policy: Json = serde_json::from_str(run_ok(cmd).trim()).expect("a policy");
    let from_events: Vec<&Json> = policy["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["Principal"].to_string().contains("events.amazonaws.com"))
        .collect();
    assert!(!from_events.is_empty(), "{policy}");
    for s in from_events {
        assert_eq!(
            s["Condition"]["ArnLike"]["AWS:SourceArn"].as_str(),
            Some(rule_arn.as_str()),
            "{policy}"
        );
    }
    // AND every request was authorized, the cleanup role's DescribeExecution among them
    r.assert_all_allowed();
    let described: Vec<Json> = r
        .decisions()
        .into_iter()
        .filter(|d| d["action"] == "states:DescribeExecution")
        .collect();
    assert_eq!(described.len(), 3, "{described:#?}");
    assert!(described.iter().all(|d| d["role"]
        .as_str()
        .is_some_and(|role| role.contains("CleanupFunctionRole"))
        && d["resource"] == json!(execution)));
}

/// Cleanup's own Catch, through the deployed stack: a component fails and EC2 answers every
/// TerminateInstances of the cleanup function with a 500, so the cleanup fails after its retries.
/// RecordFailure ends the build FAILED anyway, with both failures and the builder it could not
/// terminate in the reason, and frees the lock; the execution fails with the component's error.
/// Once EC2 answers again, the execution's end event lets the reaper terminate the builder,
/// leaving the record as it was.
#[test]
fn a_cleanup_that_fails_every_attempt_still_ends_the_deployed_build_failed_with_its_lock_free() {
    let r = Rehearsal::deploy();
    r.apply(&moto_pipeline());
    let rt = runtime();
    let admin = r.admin(&rt);
    let id = "cleanup-fails-1";
    // GIVEN a component that fails, and EC2 refusing the cleanup function's TerminateInstances
    r.inject(json!([
        {"role": "CustomizeFunctionRole", "operation": "AmazonSSM.GetCommandInvocation",
         "commandStatus": "Failed"},
        {"role": "CleanupFunctionRole", "operation": "TerminateInstances",
         "error": {"status": 500, "code": "InternalError", "message": "injected: EC2 is down"}}
    ]));
    // WHEN the build runs
    let outcome = r.execute(&rt, "al2023-moto", id);
    r.inject(json!([]));
    // THEN the execution fails with the component's error, not the cleanup's
    assert_eq!(outcome.status, Status::Failed, "{:?}", outcome.cause);
    assert_eq!(
        outcome.error.as_deref(),
        Some("Kiln.ComponentFailed"),
        "{:?}",
        outcome.cause
    );
    // AND the cleanup was tried with its retries, then RecordFailure ran
    let attempts = outcome
        .history
        .iter()
        .filter(|e| e.kind == "LambdaFunctionFailed" && e.state.as_deref() == Some("Cleanup"))
        .count();
    assert_eq!(attempts, 7, "the cleanup and its six retries");
    assert!(outcome
        .history
        .iter()
        .any(|e| e.kind == "TaskStateEntered" && e.state.as_deref() == Some("RecordFailure")));
    // AND the build is FAILED at customize, the reason naming both failures and the builder
    let failed = r.build_of(&rt, id);
    assert_eq!(failed.status, kiln::model::build::BuildStatus::Failed);
    let failure = failed.failure.clone().expect("the reason");
    assert_eq!(
        (failure.stage.as_str(), failure.error.as_str()),
        ("customize", "Kiln.ComponentFailed")
    );
    let builder = failed.builder.as_ref().expect("a builder").id.0.clone();
    assert!(
        failure
            .message
            .contains("then the cleanup failed (Kiln.Retryable: TerminateInstances")
            && failure.message.contains(&builder),
        "{}",
        failure.message
    );
    // AND the lock is free, while the builder EC2 would not terminate still runs
    r.assert_lock_free(&rt, "al2023-moto", "after a failed cleanup");
    assert_eq!(instance_state(&rt, &admin, &builder), "running");
    // AND every request was authorized (the 500s are faults, not denials)
    r.assert_all_allowed();

    // WHEN EC2 answers again and the execution's end event reaches the reaper (moto's Step
    // Functions can only stop an execution: its record ends ABORTED, where AWS's ends FAILED)
    let input = json!({"pipeline": "al2023-moto", "trigger": {"kind": "manual"}, "waitSeconds": 1});
    let execution = r.start_recorded_execution(&rt, id, &input);
    r.stop_recorded_execution(&rt, &execution);
    let ended =
        execution_status_change(&execution, &r.outputs["StateMachineArn"], "ABORTED", &input);
    let (ok, reaped) = r.invoke("CleanupFunction", ended);
    // THEN the builder is terminated, and the build stays FAILED with its reason
    assert!(ok, "{reaped}");
    assert_eq!(
        (&reaped["reaped"], &reaped["now"]),
        (&json!(false), &json!("FAILED")),
        "{reaped}"
    );
    assert_eq!(instance_state(&rt, &admin, &builder), "terminated");
    assert_eq!(
        serde_json::to_value(r.build_of(&rt, id)).expect("JSON"),
        serde_json::to_value(&failed).expect("JSON")
    );
    r.assert_all_allowed();
}
