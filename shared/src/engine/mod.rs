//! The embedded Step Functions: an interpreter of the Amazon States Language (JSONPath query
//! language) that behaves like AWS — the same input/output processing, error names, retry
//! timing and history events — so that what passes locally holds in the cloud.

pub mod choice;
pub mod clock;
pub mod definition;
pub mod error;
pub mod intrinsic;
pub mod mock;
pub mod path;
pub mod payload;
pub mod rng;
pub mod tokens;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value as Json};

use clock::Clock;
use definition::{Kind, Machine, NumOrPath, PathField, State};
pub use error::StateError;

/// Runs Task states. Resources are the strings in the definition after `${Name}` substitution.
pub trait Tasks: Send + Sync {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> BoxFuture<'a, Result<Json, StateError>>;
}

/// Task states that cannot run here: each fails with `States.Runtime`, naming its state and
/// resource, then `hint` (what to do instead).
#[derive(Debug, Clone, Copy)]
pub struct NoTasks(pub &'static str);

impl Tasks for NoTasks {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        _input: Json,
    ) -> BoxFuture<'a, Result<Json, StateError>> {
        let e = StateError::new(
            "States.Runtime",
            format!(
                "state `{state}`: no handler for resource `{resource}`{}",
                self.0
            ),
        );
        Box::pin(async move { Err(e) })
    }
}

/// Task states answered at once by a function of (resource, state, input).
#[derive(Debug)]
pub struct TaskFn<F>(pub F);

impl<F> Tasks for TaskFn<F>
where
    F: Fn(&str, &str, Json) -> Result<Json, StateError> + Send + Sync,
{
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> BoxFuture<'a, Result<Json, StateError>> {
        let result = (self.0)(resource, state, input);
        Box::pin(async move { result })
    }
}

/// The most a state's input or output may hold, as in AWS (256 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 262_144;

/// Whether `value`, as JSON text, is larger than [`MAX_PAYLOAD_BYTES`] (counted, not built).
fn over_payload_limit(value: &Json) -> bool {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > MAX_PAYLOAD_BYTES {
                // Enough counted: stop serialising.
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, value).is_err() && c.0 > MAX_PAYLOAD_BYTES
}
/// The most events one execution may record, as in AWS.
pub const MAX_HISTORY_EVENTS: usize = 25_000;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Json::is_null")]
    pub details: Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Succeeded,
    Failed,
    /// The execution ran past the definition's TimeoutSeconds.
    TimedOut,
}

/// How an execution ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub status: Status,
    pub output: Option<Json>,
    pub error: Option<String>,
    pub cause: Option<String>,
    #[serde(skip)]
    pub history: Vec<Event>,
    /// Retry attempts made (each is billed as a state transition).
    #[serde(skip)]
    pub retries: usize,
}

impl Outcome {
    /// State transitions, as AWS bills them: one per state entered and one per retry attempt
    /// (AWS pricing: "Step Functions counts a state transition each time a step of your
    /// workflow is executed", retries included).
    pub fn state_transitions(&self) -> usize {
        self.history
            .iter()
            .filter(|e| e.kind.ends_with("StateEntered"))
            .count()
            + self.retries
    }

    /// Task invocations (Lambda invocations for Lambda resources).
    pub fn task_invocations(&self) -> usize {
        self.history
            .iter()
            .filter(|e| e.kind == "TaskScheduled" || e.kind == "LambdaFunctionScheduled")
            .count()
    }
}

/// The interpreter. One engine runs any number of executions.
pub struct Engine {
    pub tasks: Arc<dyn Tasks>,
    pub clock: Arc<dyn Clock>,
    /// Whether `clock` is virtual: task timeouts are then measured on it.
    pub virtual_time: bool,
    pub max_events: usize,
    /// Where full jitter's fractions come from: random, or a seeded sequence ([`rng::Rng`]) for
    /// reproducible runs (`kiln simulate`).
    pub jitter_seed: Option<Mutex<rng::Rng>>,
    /// The tokens `.waitForTaskToken` tasks wait on: answer them here (SendTaskSuccess).
    pub tokens: Arc<tokens::TaskTokens>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("virtual_time", &self.virtual_time)
            .finish_non_exhaustive()
    }
}

struct Run<'e> {
    engine: &'e Engine,
    history: Mutex<Vec<Event>>,
    next_id: AtomicU64,
    overflow: AtomicBool,
    context: Json,
    retries: AtomicU64,
    /// The execution's end by its TimeoutSeconds, and those seconds.
    deadline: Option<(chrono::DateTime<chrono::Utc>, f64)>,
}

enum Step {
    Next(String, Json),
    End(Json),
}

/// The workflow variables in scope: the execution's, or a Map iteration's or Parallel branch's
/// (a copy of the enclosing scope; what it assigns stays inside).
type Variables = serde_json::Map<String, Json>;

/// One successful try of a state: its output, the next state a Choice chose, and what its
/// `Assign` is evaluated against (the template, the value `$` refers to).
struct Attempted {
    output: Json,
    next: Option<String>,
    assign: Option<(Json, Json)>,
}

fn runtime(m: impl Into<String>) -> StateError {
    StateError::new("States.Runtime", m)
}

fn is_lambda(resource: &str) -> bool {
    resource.starts_with("arn:aws:lambda:")
        || resource.starts_with("arn:aws:states:::lambda:invoke")
}

/// A Task's Lambda invocation: the function and the event, as the resource names them — the
/// Lambda service integration (`arn:aws:states:::lambda:invoke[.waitForTaskToken]`) in its
/// `FunctionName` and `Payload` parameters, a Lambda ARN as the resource with the input.
#[derive(Debug, Clone, PartialEq)]
pub struct LambdaCall {
    pub function: String,
    pub payload: Json,
    integration: bool,
}

impl LambdaCall {
    /// The function a Task's resource and input name.
    pub fn function_of<'a>(resource: &'a str, input: &'a Json) -> &'a str {
        if resource.starts_with("arn:aws:states:::lambda:invoke") {
            input["FunctionName"].as_str().unwrap_or_default()
        } else {
            resource
        }
    }

    pub fn of(resource: &str, input: Json) -> LambdaCall {
        if resource.starts_with("arn:aws:states:::lambda:invoke") {
            LambdaCall {
                function: LambdaCall::function_of(resource, &input).to_string(),
                payload: input["Payload"].clone(),
                integration: true,
            }
        } else {
            LambdaCall {
                function: resource.to_string(),
                payload: input,
                integration: false,
            }
        }
    }

    /// The Task's result for the function's answer: the integration wraps it in `Payload`.
    pub fn result(&self, answer: Json) -> Json {
        if self.integration {
            json!({"Payload": answer, "StatusCode": 200})
        } else {
            answer
        }
    }
}

/// A service integration that waits for a task token (`arn:aws:states:::….waitForTaskToken`).
pub fn waits_for_token(resource: &str) -> bool {
    resource.starts_with("arn:aws:states:::") && resource.ends_with(".waitForTaskToken")
}

impl Engine {
    pub fn new(tasks: Arc<dyn Tasks>, clock: Arc<dyn Clock>, virtual_time: bool) -> Engine {
        Engine {
            tasks,
            clock,
            virtual_time,
            max_events: MAX_HISTORY_EVENTS,
            jitter_seed: None,
            tokens: Arc::default(),
        }
    }

    /// Full jitter from a seeded sequence: the same retries wait the same on every run.
    pub fn with_jitter_seed(mut self, seed: u64) -> Engine {
        self.jitter_seed = Some(Mutex::new(rng::Rng::seeded(seed)));
        self
    }

    /// Answers to this engine's task tokens go to `tokens` (shared with whoever answers them).
    pub fn with_tokens(mut self, tokens: Arc<tokens::TaskTokens>) -> Engine {
        self.tokens = tokens;
        self
    }

    /// A fraction in [0, 1) for full jitter.
    fn jitter(&self) -> f64 {
        match &self.jitter_seed {
            Some(m) => m
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unit(),
            None => (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0,
        }
    }

    /// Runs `machine` on `input` as an execution called `name`.
    pub async fn run(&self, machine: &Machine, input: Json, name: &str) -> Outcome {
        let start = self
            .clock
            .now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let machine_arn = "arn:aws:states:local:000000000000:stateMachine:kiln";
        let context = json!({
            "Execution": {"Id": format!("arn:aws:states:local:000000000000:execution:kiln:{name}"), "Input": input, "Name": name, "StartTime": start, "RoleArn": "arn:aws:iam::000000000000:role/kiln"},
            "StateMachine": {"Id": machine_arn, "Name": "kiln"},
        });
        let run = Run {
            engine: self,
            history: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            overflow: AtomicBool::new(false),
            context,
            retries: AtomicU64::new(0),
            deadline: machine.timeout_seconds.map(|t| {
                (
                    self.clock.now() + chrono::Duration::milliseconds((t * 1000.0) as i64),
                    t,
                )
            }),
        };
        run.event("ExecutionStarted", None, json!({"input": input}));
        let result = if over_payload_limit(&input) {
            Err(StateError::new(
                "States.DataLimitExceeded",
                "the execution input is larger than 256 KiB",
            ))
        } else {
            match run.deadline {
                // In real time the execution is also cut off while a state is still running.
                Some((_, secs)) if !self.virtual_time => {
                    match tokio::time::timeout(
                        Duration::from_secs_f64(secs),
                        run.machine(machine, input, None, Variables::new()),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(StateError::execution_timed_out(secs)),
                    }
                }
                _ => run.machine(machine, input, None, Variables::new()).await,
            }
        };
        let (status, output, error, cause) = match result {
            Ok(output) => {
                run.event("ExecutionSucceeded", None, json!({"output": output}));
                (Status::Succeeded, Some(output), None, None)
            }
            Err(e) if e.terminal && e.error == "States.Timeout" => {
                run.event(
                    "ExecutionTimedOut",
                    None,
                    json!({"error": e.error, "cause": e.cause}),
                );
                (Status::TimedOut, None, Some(e.error), Some(e.cause))
            }
            Err(e) => {
                let (error, cause) = (e.reported_error(), e.reported_cause());
                run.event(
                    "ExecutionFailed",
                    None,
                    json!({"error": error, "cause": cause}),
                );
                (Status::Failed, None, error, cause)
            }
        };
        Outcome {
            status,
            output,
            error,
            cause,
            retries: run.retries.load(Ordering::Relaxed) as usize,
            history: run
                .history
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }
}

impl Run<'_> {
    /// Records an event; returns its id (0 when the history is full).
    fn event(&self, kind: &str, state: Option<&str>, details: Json) -> u64 {
        let mut h = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.len() >= self.engine.max_events {
            self.overflow.store(true, Ordering::Relaxed);
            return 0;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        h.push(Event {
            id,
            kind: kind.to_string(),
            timestamp: self
                .engine
                .clock
                .now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            state: state.map(str::to_string),
            details,
        });
        id
    }

    /// The execution's TimeoutSeconds, checked between states and after waits.
    fn check_deadline(&self) -> Result<(), StateError> {
        match self.deadline {
            Some((at, secs)) if self.engine.clock.now() > at => {
                Err(StateError::execution_timed_out(secs))
            }
            _ => Ok(()),
        }
    }

    fn check_overflow(&self) -> Result<(), StateError> {
        if self.overflow.load(Ordering::Relaxed) {
            return Err(runtime(format!(
                "the execution history reached the limit of {} events",
                self.engine.max_events
            )));
        }
        Ok(())
    }

    fn machine<'a>(
        &'a self,
        m: &'a Machine,
        input: Json,
        item: Option<&'a Json>,
        scope: Variables,
    ) -> BoxFuture<'a, Result<Json, StateError>> {
        async move {
            let mut current = m.start_at.clone();
            let mut input = input;
            let mut vars = scope;
            loop {
                self.check_deadline()?;
                let state = m
                    .states
                    .get(&current)
                    .ok_or_else(|| runtime(format!("no state `{current}`")))?;
                let (step, assigned) = self.state(state, input, item, &vars).await?;
                // Assignments take effect when the state is done: its own paths saw the old values.
                vars.extend(assigned);
                match step {
                    Step::Next(n, out) => {
                        current = n;
                        input = out;
                    }
                    Step::End(out) => return Ok(out),
                }
            }
        }
        .boxed()
    }

    fn context_for(
        &self,
        state: &State,
        retry: u32,
        item: Option<&Json>,
        vars: &Variables,
    ) -> Json {
        let mut c = match state.context_use {
            definition::ContextUse::None if vars.is_empty() => return Json::Null,
            definition::ContextUse::None => json!({}),
            definition::ContextUse::Full => self.context.clone(),
            definition::ContextUse::WithoutExecutionInput => {
                let mut c = json!({"StateMachine": self.context["StateMachine"], "Execution": {}});
                if let (Some(dst), Some(src)) = (
                    c["Execution"].as_object_mut(),
                    self.context["Execution"].as_object(),
                ) {
                    dst.extend(
                        src.iter()
                            .filter(|(k, _)| *k != "Input")
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                }
                c
            }
        };
        c["State"] = json!({"Name": state.name, "EnteredTime": self.engine.clock.now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "RetryCount": retry});
        if let Some(i) = item {
            c["Map"] = i.clone();
        }
        if !vars.is_empty() {
            c[path::VARIABLES] = Json::Object(vars.clone());
        }
        c
    }

    /// The variables an `Assign` template gives, evaluated against `source` with the values in
    /// scope when the state was entered; at most 256 KiB, as in AWS.
    fn assigned(
        &self,
        template: &Json,
        source: &Json,
        ctx: &Json,
    ) -> Result<Variables, StateError> {
        let values = payload::apply(template, source, ctx)?;
        if over_payload_limit(&values) {
            return Err(StateError::new(
                "States.DataLimitExceeded",
                "the variables a state assigns are larger than 256 KiB",
            ));
        }
        Ok(match values {
            Json::Object(m) => m,
            _ => Variables::new(),
        })
    }

    async fn state(
        &self,
        state: &State,
        raw: Json,
        item: Option<&Json>,
        vars: &Variables,
    ) -> Result<(Step, Variables), StateError> {
        let ty = state.type_name();
        let entered = self.event(
            &format!("{ty}StateEntered"),
            Some(&state.name),
            json!({"input": raw}),
        );
        self.check_overflow()?;
        let mut counts = vec![0u32; state.retry.len()];
        let mut retries = 0u32;
        // The context of the last attempt: also what its Assign and its catcher's read.
        let mut ctx;
        let result = loop {
            ctx = self.context_for(state, retries, item, vars);
            match self
                .attempt(state, &raw, &ctx, vars)
                .await
                .map_err(|e| in_aws_words(e, &state.name, entered))
            {
                Ok(v) => break Ok(v),
                Err(e) => {
                    self.check_overflow()?;
                    let in_task = matches!(state.kind, Kind::Task { .. });
                    if let Some(i) = state
                        .retry
                        .iter()
                        .position(|r| e.matches(&r.errors, in_task))
                    {
                        let r = &state.retry[i];
                        if counts[i] < r.max_attempts {
                            let mut delay = r.interval * r.backoff.powi(counts[i] as i32);
                            if let Some(max) = r.max_delay {
                                delay = delay.min(max);
                            }
                            if r.full_jitter {
                                delay *= self.engine.jitter();
                            }
                            counts[i] += 1;
                            retries += 1;
                            self.retries.fetch_add(1, Ordering::Relaxed);
                            self.engine
                                .clock
                                .sleep(Duration::from_secs_f64(delay.max(0.0)))
                                .await;
                            self.check_deadline()?;
                            continue;
                        }
                    }
                    break Err(e);
                }
            }
        };
        let (output, next, assigned) = match result {
            Ok(a) => {
                let assigned = match &a.assign {
                    Some((template, source)) => self
                        .assigned(template, source, &ctx)
                        .map_err(|e| in_aws_words(e, &state.name, entered))?,
                    None => Variables::new(),
                };
                (a.output, a.next.or_else(|| state.next.clone()), assigned)
            }
            Err(e) => {
                let in_task = matches!(state.kind, Kind::Task { .. });
                match state.catch.iter().find(|c| e.matches(&c.errors, in_task)) {
                    Some(c) => {
                        let err_out = json!({"Error": e.error, "Cause": e.cause});
                        // A catcher's Assign reads the error output.
                        let assigned = match &c.assign {
                            Some(template) => self
                                .assigned(template, &err_out, &ctx)
                                .map_err(|e| in_aws_words(e, &state.name, entered))?,
                            None => Variables::new(),
                        };
                        let out = apply_result_path(&c.result_path, &raw, err_out)?;
                        (out, Some(c.next.clone()), assigned)
                    }
                    None => return Err(e),
                }
            }
        };
        if over_payload_limit(&output) {
            return Err(StateError::new(
                "States.DataLimitExceeded",
                format!(
                    "the output of state `{}` is larger than 256 KiB",
                    state.name
                ),
            ));
        }
        self.event(
            &format!("{ty}StateExited"),
            Some(&state.name),
            json!({"output": output}),
        );
        self.check_overflow()?;
        Ok((
            match next {
                Some(n) => Step::Next(n, output),
                None => Step::End(output),
            },
            assigned,
        ))
    }

    fn number(&self, v: &NumOrPath, input: &Json, ctx: &Json) -> Result<f64, StateError> {
        match v {
            NumOrPath::Num(n) => Ok(*n),
            NumOrPath::Path(p) => path::select(p, input, ctx)
                .map_err(runtime)?
                .as_f64()
                .ok_or_else(|| runtime("the path does not hold a number")),
        }
    }

    /// One try of a state: its output (after OutputPath), for Choice the chosen next state, and
    /// what its Assign reads.
    async fn attempt(
        &self,
        state: &State,
        raw: &Json,
        ctx: &Json,
        vars: &Variables,
    ) -> Result<Attempted, StateError> {
        let effective = apply_input_path(&state.input_path, raw, ctx)?;
        // Task, Parallel and Map: Assign reads the result before ResultSelector.
        let finish = |result: Json| -> Result<Attempted, StateError> {
            let assign = state.assign.clone().map(|t| (t, result.clone()));
            let selected = match &state.result_selector {
                Some(t) => payload::apply(t, &result, ctx)?,
                None => result,
            };
            let merged = apply_result_path(&state.result_path, raw, selected)?;
            Ok(Attempted {
                output: apply_output_path(&state.output_path, &merged, ctx)?,
                next: None,
                assign,
            })
        };
        // Wait, Succeed and a Choice's Default: Assign reads the effective input.
        let plain =
            |next: Option<String>, assign: Option<&Json>| -> Result<Attempted, StateError> {
                Ok(Attempted {
                    output: apply_output_path(&state.output_path, &effective, ctx)?,
                    next,
                    assign: assign.cloned().map(|t| (t, effective.clone())),
                })
            };
        let params = |input: &Json| -> Result<Json, StateError> {
            match &state.parameters {
                Some(t) => payload::apply(t, input, ctx),
                None => Ok(input.clone()),
            }
        };
        match &state.kind {
            Kind::Pass { result } => {
                let p = params(&effective)?;
                let r = result.clone().unwrap_or(p);
                // Pass: Assign reads the result (Result, or Parameters' output, or the input).
                let assign = state.assign.clone().map(|t| (t, r.clone()));
                let merged = apply_result_path(&state.result_path, raw, r)?;
                Ok(Attempted {
                    output: apply_output_path(&state.output_path, &merged, ctx)?,
                    next: None,
                    assign,
                })
            }
            Kind::Task {
                resource,
                timeout,
                heartbeat,
            } => {
                // A task that waits for a token gets it in `$$.Task.Token` (a new one for each
                // attempt, as in AWS).
                let token = waits_for_token(resource).then(|| self.engine.tokens.issue());
                let input = match &token {
                    Some((ticket, _)) => {
                        let t = ticket.token();
                        let mut c = match ctx {
                            Json::Object(_) => ctx.clone(),
                            _ => json!({}),
                        };
                        c["Task"] = json!({"Token": t});
                        match &state.parameters {
                            Some(p) => payload::apply(p, &effective, &c)?,
                            None => effective.clone(),
                        }
                    }
                    None => params(&effective)?,
                };
                // The task's deadline: TimeoutSeconds, or HeartbeatSeconds when shorter (kiln's
                // handlers send no heartbeats, so a task silent that long has missed one).
                let timeout = timeout
                    .as_ref()
                    .map(|t| self.number(t, &effective, ctx))
                    .transpose()?;
                let heartbeat = heartbeat
                    .as_ref()
                    .map(|t| self.number(t, &effective, ctx))
                    .transpose()?;
                let limit = match (timeout, heartbeat) {
                    (Some(t), Some(h)) if h < t => Some((h, "States.HeartbeatTimeout")),
                    (None, Some(h)) => Some((h, "States.HeartbeatTimeout")),
                    (Some(t), _) => Some((t, "States.Timeout")),
                    (None, None) => None,
                };
                // A service integration's events are Task*, the Lambda ARN's LambdaFunction*.
                let lambda = is_lambda(resource) && token.is_none();
                let (scheduled, started, succeeded, failed, timed_out) = if lambda {
                    (
                        "LambdaFunctionScheduled",
                        "LambdaFunctionStarted",
                        "LambdaFunctionSucceeded",
                        "LambdaFunctionFailed",
                        "LambdaFunctionTimedOut",
                    )
                } else {
                    (
                        "TaskScheduled",
                        "TaskStarted",
                        "TaskSucceeded",
                        "TaskFailed",
                        "TaskTimedOut",
                    )
                };
                self.event(
                    scheduled,
                    Some(&state.name),
                    json!({"resource": resource, "parameters": input}),
                );
                self.event(started, Some(&state.name), Json::Null);
                let before = self.engine.clock.now();
                let invoked = self.engine.tasks.invoke(resource, &state.name, input);
                let (mut ticket, answer) = token.unzip();
                let call = async {
                    let result = invoked.await;
                    match answer {
                        // The invocation's own result is not the state's: the token's answer is.
                        Some(answer) => {
                            result?;
                            self.event("TaskSubmitted", Some(&state.name), Json::Null);
                            answer.await.unwrap_or_else(|_| {
                                Err(runtime("the task token was dropped unanswered"))
                            })
                        }
                        None => result,
                    }
                };
                let outcome = match limit {
                    // A token's answer comes from outside the engine, in real (or tokio's) time.
                    Some((secs, name)) if !self.engine.virtual_time || ticket.is_some() => {
                        match tokio::time::timeout(Duration::from_secs_f64(secs), call).await {
                            Ok(r) => r,
                            Err(_) => Err(StateError::new(
                                name,
                                format!("the task did not finish within {secs} seconds"),
                            )),
                        }
                    }
                    Some((secs, name)) => {
                        let r = call.await;
                        let spent =
                            (self.engine.clock.now() - before).num_milliseconds() as f64 / 1000.0;
                        if spent > secs {
                            Err(StateError::new(
                                name,
                                format!("the task did not finish within {secs} seconds"),
                            ))
                        } else {
                            r
                        }
                    }
                    None => call.await,
                };
                if let Some(t) = ticket.as_mut() {
                    if matches!(&outcome, Err(e)
                        if e.error == "States.Timeout" || e.error == "States.HeartbeatTimeout")
                    {
                        t.timed_out();
                    }
                }
                drop(ticket);
                match outcome {
                    Ok(result) if over_payload_limit(&result) => {
                        let e = StateError::new(
                            "States.DataLimitExceeded",
                            format!(
                                "The state/task '{}' returned a result with a size exceeding the maximum number of bytes service limit.",
                                state.name
                            ),
                        );
                        self.event(
                            failed,
                            Some(&state.name),
                            json!({"error": e.error, "cause": e.cause}),
                        );
                        Err(e)
                    }
                    Ok(result) => {
                        self.event(succeeded, Some(&state.name), json!({"output": result}));
                        finish(result)
                    }
                    Err(e) => {
                        let kind = if e.error == "States.Timeout"
                            || e.error == "States.HeartbeatTimeout"
                        {
                            timed_out
                        } else {
                            failed
                        };
                        self.event(
                            kind,
                            Some(&state.name),
                            json!({"error": e.error, "cause": e.cause}),
                        );
                        Err(e)
                    }
                }
            }
            Kind::Choice { choices, default } => {
                // The matched rule's Assign, or the state's for its Default.
                for (rule, next) in choices {
                    if choice::evaluate(rule, &effective, ctx)? {
                        return plain(Some(next.clone()), rule.get("Assign"));
                    }
                }
                match default {
                    Some(d) => plain(Some(d.clone()), state.assign.as_ref()),
                    None => Err(StateError::new(
                        "States.NoChoiceMatched",
                        format!(
                            "no choice rule matched and state `{}` has no Default",
                            state.name
                        ),
                    )),
                }
            }
            Kind::Wait { seconds, timestamp } => {
                let wait = match (seconds, timestamp) {
                    (Some(s), _) => {
                        let s = self.number(s, &effective, ctx)?;
                        // SecondsPath must hold an integer: AWS fails 1.5 with States.Runtime.
                        if s.fract() != 0.0 {
                            return Err(runtime(format!(
                                "The SecondsPath parameter does not reference a valid integer value: {s}"
                            )));
                        }
                        if s < 0.0 {
                            return Err(runtime("Wait seconds must not be negative"));
                        }
                        Duration::from_secs_f64(s)
                    }
                    (None, Some(t)) => {
                        let text = match t {
                            Ok(t) => t.clone(),
                            Err(p) => path::select(p, &effective, ctx)
                                .map_err(runtime)?
                                .as_str()
                                .map(str::to_string)
                                .ok_or_else(|| runtime("TimestampPath does not hold a string"))?,
                        };
                        // ISO 8601 with the `T` separator: AWS fails "2026-01-01 00:00:00Z"
                        // (chrono alone accepts the space).
                        let at = chrono::DateTime::parse_from_rfc3339(&text)
                            .ok()
                            .filter(|_| text.as_bytes().get(10) == Some(&b'T'))
                            .ok_or_else(|| {
                                runtime(format!(
                                    "The TimestampPath parameter does not reference a valid ISO-8601 extended offset date-time format string: {text}"
                                ))
                            })?;
                        (at.with_timezone(&chrono::Utc) - self.engine.clock.now())
                            .to_std()
                            .unwrap_or_default()
                    }
                    (None, None) => Duration::ZERO,
                };
                // A wait past the execution's deadline ends it at the deadline.
                let wait = match self.deadline {
                    Some((at, secs))
                        if self.engine.clock.now()
                            + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
                            > at =>
                    {
                        let left = (at - self.engine.clock.now()).to_std().unwrap_or_default();
                        self.engine
                            .clock
                            .sleep(left + Duration::from_millis(1))
                            .await;
                        return Err(StateError::execution_timed_out(secs));
                    }
                    _ => wait,
                };
                self.engine.clock.sleep(wait).await;
                plain(None, state.assign.as_ref())
            }
            Kind::Succeed => plain(None, None),
            Kind::Fail { error, cause } => {
                // Neither Error nor Cause: AWS records no error and no cause (null, not "").
                let read =
                    |f: &Option<definition::FailText>| -> Result<Option<String>, StateError> {
                        let value = match f {
                            None => return Ok(None),
                            Some(definition::FailText::Text(t)) => return Ok(Some(t.clone())),
                            Some(definition::FailText::Path(p)) => {
                                path::select(p, raw, ctx).map_err(runtime)?
                            }
                            Some(definition::FailText::Intrinsic(expr)) => {
                                intrinsic::evaluate(expr, raw, ctx)
                                    .map_err(|e| StateError::new("States.IntrinsicFailure", e))?
                            }
                        };
                        value
                            .as_str()
                            .map(|s| Some(s.to_string()))
                            .ok_or_else(|| runtime("ErrorPath/CausePath must select a string"))
                    };
                Err(StateError::fail_state(read(error)?, read(cause)?))
            }
            Kind::Parallel { branches } => {
                let input = params(&effective)?;
                self.event("ParallelStateStarted", Some(&state.name), Json::Null);
                let runs = branches
                    .iter()
                    .map(|b| self.machine(b, input.clone(), None, vars.clone()));
                let results = futures::future::join_all(runs).await;
                let mut outputs = Vec::with_capacity(results.len());
                for r in results {
                    match r {
                        Ok(o) => outputs.push(o),
                        Err(e) => {
                            self.event(
                                "ParallelStateFailed",
                                Some(&state.name),
                                json!({"error": e.error, "cause": e.cause}),
                            );
                            return Err(e);
                        }
                    }
                }
                self.event("ParallelStateSucceeded", Some(&state.name), Json::Null);
                finish(Json::Array(outputs))
            }
            Kind::Map {
                items_path,
                item_selector,
                processor,
                max_concurrency,
                tolerated_count,
                tolerated_percentage,
            } => {
                let items = path::select(items_path, &effective, ctx).map_err(runtime)?;
                let items = items.as_array().cloned().ok_or_else(|| {
                    runtime(format!(
                        "ItemsPath of state `{}` does not select an array",
                        state.name
                    ))
                })?;
                let limit = max_concurrency
                    .as_ref()
                    .map(|m| self.number(m, &effective, ctx))
                    .transpose()?
                    .map(|m| m as usize)
                    .filter(|m| *m > 0)
                    .unwrap_or(usize::MAX);
                let tolerance = (
                    tolerated_count
                        .as_ref()
                        .map(|t| self.number(t, &effective, ctx))
                        .transpose()?,
                    tolerated_percentage
                        .as_ref()
                        .map(|t| self.number(t, &effective, ctx))
                        .transpose()?,
                );
                self.event(
                    "MapStateStarted",
                    Some(&state.name),
                    json!({"length": items.len()}),
                );
                let total = items.len();
                let work = items.into_iter().enumerate().map(|(index, value)| {
                    let effective = &effective;
                    async move {
                        let item_ctx = json!({"Item": {"Index": index, "Value": value}});
                        let mut c = ctx.clone();
                        c["Map"] = item_ctx.clone();
                        let input = match item_selector {
                            Some(t) => payload::apply(t, effective, &c).map_err(|e| (index, e))?,
                            None => value,
                        };
                        self.event(
                            "MapIterationStarted",
                            Some(&state.name),
                            json!({"index": index}),
                        );
                        let r = self
                            .machine(processor, input, Some(&item_ctx), vars.clone())
                            .await;
                        self.event(
                            if r.is_ok() {
                                "MapIterationSucceeded"
                            } else {
                                "MapIterationFailed"
                            },
                            Some(&state.name),
                            json!({"index": index}),
                        );
                        r.map(|o| (index, o)).map_err(|e| (index, e))
                    }
                    .boxed()
                });
                let results: Vec<Result<(usize, Json), (usize, StateError)>> =
                    futures::stream::iter(work)
                        .buffer_unordered(limit.min(total.max(1)))
                        .collect()
                        .await;
                let mut outputs: Vec<(usize, Json)> = Vec::with_capacity(total);
                let mut failures: Vec<(usize, StateError)> = Vec::new();
                for r in results {
                    match r {
                        Ok(o) => outputs.push(o),
                        Err(e) => failures.push(e),
                    }
                }
                failures.sort_by_key(|(i, _)| *i);
                if !failures.is_empty() {
                    let tolerated = match tolerance {
                        (None, None) => false,
                        (count, pct) => {
                            let n = failures.len() as f64;
                            count.is_none_or(|c| n <= c)
                                && pct.is_none_or(|p| n * 100.0 / total as f64 <= p)
                                && (count.is_some() || pct.is_some())
                        }
                    };
                    if !tolerated {
                        let e = if tolerance == (None, None) {
                            failures.swap_remove(0).1
                        } else {
                            StateError::new("States.ExceedToleratedFailureThreshold", format!("{} of {total} iterations failed, more than the Map state tolerates", failures.len()))
                        };
                        self.event(
                            "MapStateFailed",
                            Some(&state.name),
                            json!({"error": e.error, "cause": e.cause}),
                        );
                        return Err(e);
                    }
                    for (i, e) in failures {
                        outputs.push((i, json!({"Error": e.error, "Cause": e.cause})));
                    }
                }
                outputs.sort_by_key(|(i, _)| *i);
                self.event("MapStateSucceeded", Some(&state.name), Json::Null);
                finish(Json::Array(outputs.into_iter().map(|(_, o)| o).collect()))
            }
        }
    }
}

/// The cause of an error the engine raises while running a state, in Step Functions' words:
/// "An error occurred while executing the state 'X' (entered at the event id #N). …", so tools
/// that match on causes behave as with AWS. Errors from tasks, and causes already worded so (from
/// a nested state), are left as they are.
fn in_aws_words(mut e: StateError, state: &str, entered: u64) -> StateError {
    const PREFIX: &str = "An error occurred while executing the state";
    if matches!(
        e.error.as_str(),
        "States.Runtime" | "States.IntrinsicFailure"
    ) && !e.cause.starts_with(PREFIX)
    {
        let cause = format!(
            "{PREFIX} '{state}' (entered at the event id #{entered}). {}",
            e.cause
        );
        e = e.with_cause(cause);
    }
    e
}

fn apply_input_path(p: &PathField, raw: &Json, ctx: &Json) -> Result<Json, StateError> {
    match p {
        PathField::Default => Ok(raw.clone()),
        PathField::Null => Ok(json!({})),
        PathField::Path(p) => path::select(p, raw, ctx)
            .map_err(|e| runtime(format!("Invalid path in InputPath: {e}"))),
    }
}

fn apply_output_path(p: &PathField, merged: &Json, ctx: &Json) -> Result<Json, StateError> {
    match p {
        PathField::Default => Ok(merged.clone()),
        PathField::Null => Ok(json!({})),
        PathField::Path(p) => path::select(p, merged, ctx)
            .map_err(|e| runtime(format!("Invalid path in OutputPath: {e}"))),
    }
}

fn apply_result_path(p: &PathField, raw: &Json, result: Json) -> Result<Json, StateError> {
    match p {
        PathField::Default => Ok(result),
        PathField::Null => Ok(raw.clone()),
        PathField::Path(p) => {
            let mut out = raw.clone();
            path::set(&mut out, p, result)
                .map_err(|e| StateError::new("States.ResultPathMatchFailure", e))?;
            Ok(out)
        }
    }
}

/// Replaces `${Name}` in every string of a definition (SAM's DefinitionSubstitutions).
pub fn substitute(definition: &Json, values: &HashMap<String, String>) -> Json {
    match definition {
        Json::String(s) => {
            let mut out = s.clone();
            for (k, v) in values {
                out = out.replace(&format!("${{{k}}}"), v);
            }
            Json::String(out)
        }
        Json::Array(a) => Json::Array(a.iter().map(|x| substitute(x, values)).collect()),
        Json::Object(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), substitute(v, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}
