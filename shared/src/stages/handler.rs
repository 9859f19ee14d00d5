//! One entry point per stage function, shared by the Lambda functions and the embedded engine:
//! the event `{"op": …, "build": …}` in, the operation's result out, errors with their
//! `Kiln.*` names. The state machine's Task states name these functions.

use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, RegionImage};
use crate::ports::calls::*;
use crate::ports::{Calls, Ports, Select};

use super::{cleanup, customize, distribute, launch_builder, snapshot, test_image, StartRequest};

/// The stage functions, named as in `functions/<name>` and the SAM template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    LaunchBuilder,
    Customize,
    Snapshot,
    TestImage,
    Distribute,
    Cleanup,
    /// Ends waits by events: the `.waitForTaskToken` tasks' `watch`, the EventBridge rules'
    /// target (see [`super::wake`]).
    Wake,
}

impl Function {
    pub const ALL: [Function; 7] = [
        Function::LaunchBuilder,
        Function::Customize,
        Function::Snapshot,
        Function::TestImage,
        Function::Distribute,
        Function::Cleanup,
        Function::Wake,
    ];

    /// The function's name: the Lambda package and the `functions/` folder.
    pub fn name(self) -> &'static str {
        match self {
            Function::LaunchBuilder => "launch-builder",
            Function::Customize => "customize",
            Function::Snapshot => "snapshot",
            Function::TestImage => "test-image",
            Function::Distribute => "distribute",
            Function::Cleanup => "cleanup",
            Function::Wake => "wake",
        }
    }

    /// The `${Name}` the state machine uses for the function's ARN (SAM DefinitionSubstitutions).
    pub fn substitution(self) -> &'static str {
        match self {
            Function::LaunchBuilder => "LaunchBuilderFunctionArn",
            Function::Customize => "CustomizeFunctionArn",
            Function::Snapshot => "SnapshotFunctionArn",
            Function::TestImage => "TestImageFunctionArn",
            Function::Distribute => "DistributeFunctionArn",
            Function::Cleanup => "CleanupFunctionArn",
            Function::Wake => "WakeFunctionArn",
        }
    }

    /// The port calls the function's code makes: its bootstrap links the AWS operations of
    /// those calls only (`kiln::lambda`), and [`handle`] refuses the others wherever the stage
    /// code runs, so every test of a stage holds it to this declaration.
    pub const fn uses(self) -> Calls {
        // What every stage's bookkeeping calls (the build record, the pipeline's version).
        const BOOKS: Calls = STORE_PIPELINE | STORE_BUILD | STORE_SAVE_BUILD;
        match self {
            Function::LaunchBuilder => {
                BOOKS
                    | STORE_BUILDS
                    | STORE_CREATE_BUILD
                    | STORE_LOCK
                    | STORE_UNLOCK
                    | EVENTS_EMIT
                    | PARAMETERS_GET
                    | COMPUTE_LATEST_IMAGE
                    | COMPUTE_IMAGE_NAMED
                    | COMPUTE_DESCRIBE_IMAGE
                    | COMPUTE_INSTANCE_ARCHITECTURES
                    | COMPUTE_LAUNCH
                    | COMPUTE_INSTANCE_STATE
                    | COMMANDS_AGENT_ONLINE
            }
            Function::Customize => BOOKS | COMMANDS_SEND | COMMANDS_STATUS,
            Function::Snapshot => {
                BOOKS
                    | EVENTS_EMIT
                    | COMPUTE_INSTANCE_STATE
                    | COMPUTE_STOP
                    | COMPUTE_IMAGES_OF
                    | COMPUTE_CREATE_IMAGE
                    | COMPUTE_IMAGE_STATE
                    | COMPUTE_TERMINATE
            }
            Function::TestImage => {
                BOOKS
                    | EVENTS_EMIT
                    | COMPUTE_LAUNCH
                    | COMPUTE_INSTANCE_STATE
                    | COMPUTE_TERMINATE
                    | COMMANDS_AGENT_ONLINE
                    | COMMANDS_SEND
                    | COMMANDS_STATUS
            }
            Function::Distribute => {
                BOOKS
                    | STORE_UNLOCK
                    | EVENTS_EMIT
                    | PARAMETERS_PUT
                    | COMPUTE_COPY_IMAGE
                    | COMPUTE_IMAGE_STATE
                    | COMPUTE_SHARE_IMAGE
                    | COMPUTE_NEW_LAUNCH_TEMPLATE_VERSION
            }
            Function::Cleanup => {
                BOOKS
                    | STORE_BUILDS
                    | STORE_PIPELINE_NAMES
                    | STORE_UNLOCK
                    | EVENTS_EMIT
                    | TRIGGERS_DISABLE
                    | COMPUTE_INSTANCES_OF
                    | COMPUTE_TERMINATE
                    | COMPUTE_IMAGES_OF
                    | COMPUTE_DELETE_IMAGE
                    | COMPUTE_PIPELINE_IMAGES
                    | COMPUTE_DEPRECATE_IMAGE
            }
            Function::Wake => {
                WAKEUPS_REGISTER
                    | WAKEUPS_REGISTERED
                    | WAKEUPS_WAKE
                    | COMPUTE_INSTANCE_STATE
                    | COMPUTE_IMAGE_STATE
                    | COMMANDS_STATUS
            }
        }
    }

    pub fn by_name(name: &str) -> Option<Function> {
        Function::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The function a Task state's resource names: a Lambda ARN ending in
    /// `function:kiln-<name>`, or the bare name.
    pub fn of_resource(resource: &str) -> Option<Function> {
        let name = resource
            .rsplit_once(":function:kiln-")
            .map_or(resource, |(_, n)| n);
        Function::by_name(name)
    }
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(default)]
    op: String,
    #[serde(default)]
    request: Option<StartRequest>,
    #[serde(default)]
    build: Option<Build>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    entry: Option<RegionImage>,
    #[serde(default)]
    regions: Option<Vec<RegionImage>>,
    /// Wake: the task token, and what it waits for.
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    awaiting: Option<crate::model::build::Awaited>,
    /// Cleanup: the error the state machine caught (`{"Error", "Cause"}`).
    #[serde(default)]
    error: Option<CaughtError>,
    /// Cleanup's `record`: the error the cleanup itself failed with.
    #[serde(default, rename = "cleanupError")]
    cleanup_error: Option<CaughtError>,
}

impl CaughtError {
    /// (error, cause) of a caught error, or an unknown failure when there is none.
    fn parts(caught: Option<&CaughtError>) -> (&str, &str) {
        caught
            .map(|c| (c.error.as_str(), c.cause.as_str()))
            .unwrap_or(("Kiln.Internal", "unknown failure"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CaughtError {
    error: String,
    #[serde(default)]
    cause: String,
}

fn bad(why: impl Into<String>) -> StageError {
    StageError::new(ErrorKind::Internal, why.into())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Json, StageError> {
    serde_json::to_value(v).map_err(|e| bad(e.to_string()))
}

/// Runs one invocation of `function`, its ports narrowed to the calls it declares.
pub async fn handle(
    ports: &Ports<'_>,
    function: Function,
    event: Json,
) -> Result<Json, StageError> {
    macro_rules! narrowed {
        ($($f:ident),*) => {
            match function {
                $(Function::$f => {
                    const M: Calls = Function::$f.uses();
                    let select = Select::<Ports<'_>, M>::new(ports, Function::$f.name());
                    dispatch(&select.ports(ports.clock), function, event).await
                })*
            }
        };
    }
    narrowed!(
        LaunchBuilder,
        Customize,
        Snapshot,
        TestImage,
        Distribute,
        Cleanup,
        Wake
    )
}

async fn dispatch(ports: &Ports<'_>, function: Function, event: Json) -> Result<Json, StageError> {
    if function == Function::Wake && event.get("detail-type").is_some() {
        return super::wake::on_event(ports, &event).await;
    }
    let e: Event = serde_json::from_value(event)
        .map_err(|e| bad(format!("invalid {} event: {e}", function.name())))?;
    let build = || {
        e.build.clone().ok_or_else(|| {
            bad(format!(
                "{} {}: the event has no build",
                function.name(),
                e.op
            ))
        })
    };
    match (function, e.op.as_str()) {
        (Function::LaunchBuilder, "start") => to_json(
            &launch_builder::start(
                ports,
                e.request
                    .as_ref()
                    .ok_or_else(|| bad("launch-builder start: the event has no request"))?,
            )
            .await?,
        ),
        (Function::LaunchBuilder, "check") => {
            to_json(&launch_builder::check(ports, build()?).await?)
        }
        (Function::Customize, "start") => to_json(&customize::start(ports, build()?).await?),
        (Function::Customize, "check") => to_json(&customize::check(ports, build()?).await?),
        (Function::Snapshot, "start") => to_json(&snapshot::start(ports, build()?).await?),
        (Function::Snapshot, "check") => to_json(&snapshot::check(ports, build()?).await?),
        (Function::TestImage, "start") => to_json(&test_image::start(ports, build()?).await?),
        (Function::TestImage, "check") => to_json(&test_image::check(ports, build()?).await?),
        (Function::Distribute, "begin") => to_json(&distribute::begin(ports, build()?).await?),
        (Function::Distribute, "start") => to_json(
            &distribute::start(
                ports,
                &build()?,
                e.region
                    .as_deref()
                    .ok_or_else(|| bad("distribute start: no region"))?,
            )
            .await?,
        ),
        (Function::Distribute, "check") => to_json(
            &distribute::check(
                ports,
                &build()?,
                e.entry
                    .clone()
                    .ok_or_else(|| bad("distribute check: no entry"))?,
            )
            .await?,
        ),
        (Function::Distribute, "plan") => to_json(&distribute::plan(ports, build()?).await?),
        (Function::Distribute, "copies") => {
            to_json(&distribute::start_copies(ports, &build()?).await?)
        }
        (Function::Distribute, "await") => to_json(
            &distribute::await_copies(ports, &build()?, e.regions.clone().unwrap_or_default())
                .await?,
        ),
        (Function::Distribute, "finish") => to_json(
            &distribute::finish(ports, build()?, e.regions.clone().unwrap_or_default()).await?,
        ),
        // The daily lifecycle run (the stack's schedule invokes the cleanup function with it).
        (Function::Cleanup, "lifecycle") => super::lifecycle::run_all(ports).await,
        // The Catch of the cleanup itself: the store only (see `cleanup::record`).
        (Function::Cleanup, "record") => {
            let caught = CaughtError::parts(e.error.as_ref());
            let failed = CaughtError::parts(e.cleanup_error.as_ref());
            match (&e.build, &e.request) {
                (Some(b), _) => to_json(
                    &cleanup::record(ports, b.clone(), caught.0, caught.1, failed.0, failed.1)
                        .await?,
                ),
                (None, Some(r)) => Ok(cleanup::record_for_request(ports, r, caught, failed)
                    .await?
                    .map(|b| to_json(&b))
                    .transpose()?
                    .unwrap_or_else(|| json!(null))),
                (None, None) => Ok(json!(null)),
            }
        }
        (Function::Cleanup, _) => {
            let (error, cause) = CaughtError::parts(e.error.as_ref());
            match (&e.build, &e.request) {
                (Some(b), _) => to_json(&cleanup::run(ports, b.clone(), error, cause).await?),
                (None, Some(r)) => Ok(cleanup::run_for_request(ports, r, error, cause)
                    .await?
                    .map(|b| to_json(&b))
                    .transpose()?
                    .unwrap_or_else(|| json!(null))),
                (None, None) => Ok(json!(null)),
            }
        }
        (Function::Wake, "watch") => match (&e.token, &e.awaiting) {
            (Some(token), Some(awaited)) => super::wake::watch(ports, token, awaited).await,
            _ => Err(bad(
                "wake watch: the event needs a token and what it awaits",
            )),
        },
        (f, op) => Err(bad(format!("{} has no operation `{op}`", f.name()))),
    }
}

/// `infra/statemachine/pipeline.asl.json`, the one definition, built into kiln so that the
/// embedded runs execute exactly what the stack deploys.
pub const DEFINITION: &str = include_str!("../../../infra/statemachine/pipeline.asl.json");

/// What the same build bills at least in the deployed stack, from an embedded run of the one
/// definition: AWS bills every state entered and every retry attempt, as the engine counts them,
/// plus `DefaultWait` (the stack's triggers start executions without `waitSeconds`, the embedded
/// run passes 0). Each poll while AWS works adds [`AWS_POLL_COST`]: AWS's instances, commands
/// and images take minutes, so a deployed build polls where the embedded one found each stage
/// ready at once.
#[cfg(feature = "engine")]
pub fn aws_bill_floor(outcome: &crate::engine::Outcome) -> (usize, usize) {
    (outcome.state_transitions() + 1, outcome.task_invocations())
}

/// One poll of a stage in the deployed state machine: Wait, the check Task, the Choice — three
/// state transitions and one Lambda invocation, every `waitSeconds` (30 by default).
pub const AWS_POLL_COST: (usize, usize) = (3, 1);

/// The deployed state machine's poll interval: its `DefaultWait` state's `Result`.
pub fn aws_poll_seconds() -> u64 {
    serde_json::from_str::<serde_json::Value>(DEFINITION)
        .ok()
        .and_then(|d| d["States"]["DefaultWait"]["Result"].as_u64())
        .unwrap_or(30)
}

/// The state machine's `${Name}` substitutions for running it in-process: each function gets a
/// Lambda-shaped ARN (so the history and the bill read as they would in AWS).
pub fn local_substitutions() -> std::collections::HashMap<String, String> {
    Function::ALL
        .iter()
        .map(|f| {
            (
                f.substitution().to_string(),
                format!(
                    "arn:aws:lambda:local:000000000000:function:kiln-{}",
                    f.name()
                ),
            )
        })
        .collect()
}

/// Runs the state machine's Task states in-process with the stage code over a set of ports:
/// the embedded mode, and the tests of the real definition.
#[cfg(feature = "engine")]
pub struct StageTasks<P>(pub std::sync::Arc<P>);

#[cfg(feature = "engine")]
impl<P> std::fmt::Debug for StageTasks<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StageTasks")
    }
}

#[cfg(feature = "engine")]
impl<P: crate::ports::PortsProvider + 'static> crate::engine::Tasks for StageTasks<P> {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        _state: &'a str,
        input: Json,
    ) -> futures::future::BoxFuture<'a, Result<Json, crate::engine::StateError>> {
        Box::pin(async move {
            let call = crate::engine::LambdaCall::of(resource, input);
            let function = Function::of_resource(&call.function).ok_or_else(|| {
                crate::engine::StateError::new(
                    "States.Runtime",
                    format!(
                        "no stage function for resource `{resource}` (`{}`)",
                        call.function
                    ),
                )
            })?;
            let ports = self.0.ports();
            let out = handle(&ports, function, call.payload.clone())
                .await
                .map_err(|e| {
                    crate::engine::StateError::from_lambda(e.error_type(), &e.to_string())
                })?;
            Ok(call.result(out))
        })
    }
}
