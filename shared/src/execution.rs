//! One build's execution by the embedded engine, as `kiln run`, `kiln serve` and `kiln simulate`
//! drive it: the state machine built from the one definition, the stage code behind its Task
//! states, what a display learns while it runs (the timeline), and the cleanup of an
//! interrupted build. The front ends only show it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value as Json};

use crate::engine::clock::Clock;
use crate::engine::definition::{self, Machine};
use crate::engine::{substitute, Engine, Outcome, StateError, Tasks};
use crate::model::build::Build;
use crate::ports::{Ports, PortsProvider};
use crate::stages::handler::{Function, StageTasks};

/// The state machine of `definition` (ASL text) with its `${...}` placeholders replaced.
pub fn machine(
    definition: &str,
    substitutions: &HashMap<String, String>,
) -> Result<Machine, String> {
    let text: Json = serde_json::from_str(definition)
        .map_err(|e| format!("the state machine definition is not JSON: {e}"))?;
    definition::parse(&substitute(&text, substitutions))
        .map_err(|e| format!("the state machine definition is invalid: {e:?}"))
}

/// The stage a function's tasks belong to, as a user reads it.
pub fn stage_of(function: Function) -> &'static str {
    match function {
        Function::LaunchBuilder => "launch",
        Function::Customize => "build",
        Function::Snapshot => "snapshot",
        Function::TestImage => "test",
        Function::Distribute => "distribute",
        Function::Cleanup => "cleanup",
        Function::Wake => "wake",
    }
}

/// The distribute function's states that make the copies (beside the test in the built-in
/// definition; `RegionStart` in the sequential one of `tests/data/simulate`); its other states
/// share and publish them.
const COPY_STATES: [&str; 4] = ["CopyPlan", "Copies", "CopiesCheck", "RegionStart"];

/// The span a task counts in: its stage, with distribution's copying apart from publishing.
fn span_of(t: &TaskSpan) -> &'static str {
    match t.function {
        Function::Distribute if COPY_STATES.contains(&t.state.as_str()) => "copy",
        f => stage_of(f),
    }
}

/// The name the build record keeps a stage's times under.
fn record_name(stage: &str) -> &str {
    match stage {
        "build" => "customize",
        s => s,
    }
}

/// One Task invocation: which function, from which state, when (by the engine's clock).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpan {
    pub function: Function,
    pub state: String,
    pub started: DateTime<Utc>,
    pub ended: Option<DateTime<Utc>>,
}

/// A stage's span: from its first task's start to its last task's end. Stages may overlap
/// (the copies run beside the test).
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpan {
    pub name: &'static str,
    pub started: DateTime<Utc>,
    pub ended: DateTime<Utc>,
    /// The build record says the stage finished (or the execution has ended).
    pub finished: bool,
}

impl StageSpan {
    pub fn seconds(&self) -> f64 {
        (self.ended - self.started).num_milliseconds() as f64 / 1000.0
    }
}

/// What an execution has done so far: every task, and the build as the last task returned it.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    pub tasks: Vec<TaskSpan>,
    pub build: Option<Build>,
    /// When the execution ended (every stage counts as finished from then on).
    pub ended: Option<DateTime<Utc>>,
}

impl Timeline {
    /// The stages in the order they started; `now` ends the spans of tasks still running.
    pub fn stages(&self, now: DateTime<Utc>) -> Vec<StageSpan> {
        let mut spans: Vec<StageSpan> = Vec::new();
        for t in &self.tasks {
            let name = span_of(t);
            let ended = t.ended.unwrap_or(now);
            match spans.iter_mut().find(|s| s.name == name) {
                Some(s) => s.ended = s.ended.max(ended),
                None => spans.push(StageSpan {
                    name,
                    started: t.started,
                    ended,
                    finished: false,
                }),
            }
        }
        let finished_in_record = |name: &str| {
            self.build.as_ref().is_some_and(|b| {
                b.stages
                    .get(record_name(name))
                    .is_some_and(|s| s.finished.is_some())
            })
        };
        // The copies are done once publishing has started.
        let publishing = spans.iter().any(|s| s.name == "distribute");
        for s in &mut spans {
            s.finished = self.ended.is_some()
                || finished_in_record(s.name)
                || (s.name == "copy" && publishing);
        }
        spans
    }

    /// The stage whose task started last.
    pub fn current(&self) -> Option<&'static str> {
        self.tasks.last().map(span_of)
    }

    /// Task invocations by function (Lambda invocations in AWS).
    pub fn invocations(&self) -> BTreeMap<&'static str, usize> {
        let mut by = BTreeMap::new();
        for t in &self.tasks {
            *by.entry(t.function.name()).or_default() += 1;
        }
        by
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a check's result says the work it waits for is done.
fn settled(result: &Json) -> bool {
    if let Some(ready) = result.get("ready").and_then(Json::as_bool) {
        return ready;
    }
    match result.get("state").and_then(Json::as_str) {
        Some(state) => state == "shared",
        None => true,
    }
}

/// The stage code behind the Task states, recording each invocation in the timeline.
///
/// With `long_poll`, a `check` operation repeats (every `interval`, for up to `limit`) until
/// what it waits for is done, so that the embedded runs' Wait states can be 0 seconds without
/// spinning the execution history. Without it every check is one invocation, as in AWS.
pub struct StageTaskAdapter<P> {
    inner: StageTasks<P>,
    timeline: Arc<Mutex<Timeline>>,
    clock: Arc<dyn Clock>,
    long_poll: Option<LongPoll>,
}

/// How long an embedded check keeps asking.
#[derive(Debug, Clone, Copy)]
pub struct LongPoll {
    pub limit: Duration,
    pub interval: Duration,
}

impl<P> std::fmt::Debug for StageTaskAdapter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageTaskAdapter")
            .field("long_poll", &self.long_poll)
            .finish_non_exhaustive()
    }
}

impl<P> StageTaskAdapter<P> {
    pub fn new(
        provider: Arc<P>,
        timeline: Arc<Mutex<Timeline>>,
        clock: Arc<dyn Clock>,
        long_poll: Option<LongPoll>,
    ) -> Self {
        StageTaskAdapter {
            inner: StageTasks(provider),
            timeline,
            clock,
            long_poll,
        }
    }
}

impl<P: PortsProvider + 'static> Tasks for StageTaskAdapter<P> {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: Json,
    ) -> BoxFuture<'a, Result<Json, StateError>> {
        Box::pin(async move {
            let function = Function::of_resource(resource);
            let span = function.map(|f| {
                let mut t = lock(&self.timeline);
                t.tasks.push(TaskSpan {
                    function: f,
                    state: state.to_string(),
                    started: self.clock.now(),
                    ended: None,
                });
                t.tasks.len() - 1
            });
            // The checks, and the copies' `await` (whose waits end by no event here).
            let op = input.get("op").and_then(Json::as_str).unwrap_or_default();
            let is_check = op == "check" || op == "await";
            let deadline = self.long_poll.map(|p| self.clock.now() + p.limit);
            let mut input = input;
            let result = loop {
                let out = self.inner.invoke(resource, state, input.clone()).await;
                let out = match out {
                    Ok(o) => o,
                    Err(e) => break Err(e),
                };
                if let Ok(b) = serde_json::from_value::<Build>(out.clone()) {
                    lock(&self.timeline).build = Some(b);
                }
                let (Some(poll), Some(deadline)) = (self.long_poll, deadline) else {
                    break Ok(out);
                };
                // A wait an event ends is the state machine's (`…Await`), not the long poll's.
                let awaits_event = out.get("awaiting").is_some_and(|a| !a.is_null());
                if !is_check || settled(&out) || awaits_event || self.clock.now() >= deadline {
                    break Ok(out);
                }
                // The next check sees what this one returned, as the state machine would pass it.
                if input.get("regions").is_some() {
                    input["regions"] = out["regions"].clone();
                } else if input.get("entry").is_some() {
                    input["entry"] = out;
                } else {
                    input["build"] = out;
                }
                self.clock.sleep(poll.interval).await;
            };
            if let Some(i) = span {
                if let Some(t) = lock(&self.timeline).tasks.get_mut(i) {
                    t.ended = Some(self.clock.now());
                }
            }
            result
        })
    }
}

/// How the execution's event waits (`…Await` states) ended: by their event, or by their
/// timeout (the bounded poll).
pub fn waits(outcome: &Outcome) -> Json {
    let count = |kind: &str| {
        outcome
            .history
            .iter()
            .filter(|e| e.kind == kind && e.state.as_deref().is_some_and(|s| s.ends_with("Await")))
            .count()
    };
    json!({"byEvent": count("TaskSucceeded"), "byTimeout": count("TaskTimedOut")})
}

/// The execution's input: which pipeline, why, how long the Wait states wait (None: the
/// definition's default, AWS's poll interval).
pub fn input(pipeline: &str, trigger: &Json, wait_seconds: Option<u64>) -> Json {
    let mut input = json!({"pipeline": pipeline, "trigger": trigger});
    if let Some(w) = wait_seconds {
        input["waitSeconds"] = json!(w);
    }
    input
}

/// Runs one execution named `request` until it ends or `interrupted` resolves first (its value,
/// e.g. an exit code, is returned as the error; the caller then cleans up with [`cancel`]).
/// `events` is the event source that answers the execution's task tokens (see
/// `stages::wake`), run beside it.
pub async fn run<I>(
    engine: &Engine,
    machine: &Machine,
    input: Json,
    request: &str,
    timeline: &Mutex<Timeline>,
    interrupted: impl std::future::Future<Output = I>,
    events: impl std::future::Future<Output = ()>,
) -> Result<Outcome, I> {
    let run = engine.run(machine, input, request);
    // The event source runs as long as the execution; it ends only if it has nothing to offer.
    let events = async {
        events.await;
        std::future::pending::<()>().await
    };
    let result = tokio::select! {
        biased;
        i = interrupted => Err(i),
        out = run => Ok(out),
        _ = events => unreachable!("the event source never ends"),
    };
    lock(timeline).ended = Some(engine.clock.now());
    result
}

/// The build an execution started, as the store has it now.
pub async fn build_of(ports: &Ports<'_>, pipeline: &str, request: &str) -> Option<Build> {
    ports
        .store
        .builds(pipeline)
        .await
        .ok()?
        .into_iter()
        .find(|b| b.request_id.as_deref() == Some(request))
}

/// Cleans up the build an interrupted execution started: instances terminated, partial images
/// removed, build CANCELLED, lock released.
pub async fn cancel(ports: &Ports<'_>, pipeline: &str, request: &str, why: &str) -> Option<Build> {
    reap(ports, pipeline, request, "Kiln.Cancelled", why).await
}

/// Cleans up the build of an execution that ended without its own cleanup (interrupted, or
/// ended by an error no Catch takes, such as States.DataLimitExceeded or States.Runtime): the
/// cleanup stage run with `error` and `cause`, as the state machine's Catch would run it —
/// instances terminated, partial images removed, the build CANCELLED (`Kiln.Cancelled`) or
/// FAILED with the reason, the lock released. Idempotent.
pub async fn reap(
    ports: &Ports<'_>,
    pipeline: &str,
    request: &str,
    error: &str,
    cause: &str,
) -> Option<Build> {
    let build = build_of(ports, pipeline, request).await?;
    let event = json!({
        "op": "run",
        "build": build,
        "error": {"Error": error, "Cause": cause}
    });
    let out = crate::stages::handler::handle(ports, Function::Cleanup, event).await;
    out.ok().and_then(|j| serde_json::from_value(j).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("a time")
    }

    #[test]
    fn overlapping_stages_keep_one_span_each() {
        let span = |f, a, b: Option<i64>| TaskSpan {
            function: f,
            state: if f == Function::Distribute && a < 40 {
                "RegionStart".to_string()
            } else {
                "RegionCheck".to_string()
            },
            started: at(a),
            ended: b.map(at),
        };
        let t = Timeline {
            tasks: vec![
                span(Function::Snapshot, 0, Some(5)),
                span(Function::TestImage, 5, Some(6)),
                span(Function::Distribute, 6, Some(7)),
                span(Function::TestImage, 30, Some(31)),
                span(Function::Distribute, 40, None),
            ],
            build: None,
            ended: None,
        };
        let stages = t.stages(at(50));
        let names: Vec<_> = stages.iter().map(|s| (s.name, s.seconds())).collect();
        assert_eq!(
            names,
            vec![
                ("snapshot", 5.0),
                ("test", 26.0),
                ("copy", 1.0),
                ("distribute", 10.0)
            ]
        );
        // Publishing has started: the copies are done; nothing else is, by the record.
        let done: Vec<_> = stages
            .iter()
            .filter(|s| s.finished)
            .map(|s| s.name)
            .collect();
        assert_eq!(done, vec!["copy"]);
        assert_eq!(t.current(), Some("distribute"));
        assert_eq!(t.invocations()["test-image"], 2);
    }
}
