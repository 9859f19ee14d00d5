//! The stage operations: launch-builder, customize, snapshot, test, distribute and cleanup, each
//! `start` → `check` (waiting lives in the state machine, never here), written once against the
//! ports. Every operation is idempotent: invoked twice with the same input it converges and
//! creates nothing twice.

pub mod cleanup;
pub mod customize;
pub mod distribute;
pub mod handler;
pub mod launch_builder;
pub mod lifecycle;
pub mod snapshot;
pub mod test_image;
pub mod wake;

use serde::{Deserialize, Serialize};

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildStatus, StageTimes, Trigger};
use crate::ports::{PipelineRecord, Ports};

/// The execution input: which pipeline, why, and the execution that asked (so that a retried
/// invocation finds the build it already created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartRequest {
    pub pipeline: String,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

fn now_text(ports: &Ports<'_>) -> String {
    ports
        .clock
        .now()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Records that `stage` started (once).
fn stage_started(ports: &Ports<'_>, build: &mut Build, stage: &str) {
    if !build.stages.contains_key(stage) {
        build.stages.insert(
            stage.to_string(),
            StageTimes {
                started: now_text(ports),
                finished: None,
            },
        );
    }
}

fn stage_finished(ports: &Ports<'_>, build: &mut Build, stage: &str) {
    let now = now_text(ports);
    build
        .stages
        .entry(stage.to_string())
        .or_insert_with(|| StageTimes {
            started: now.clone(),
            finished: None,
        })
        .finished
        .get_or_insert(now);
}

/// Moves the build to `next` and saves it, conditional on the stored status.
async fn transition(
    ports: &Ports<'_>,
    build: &mut Build,
    next: BuildStatus,
) -> Result<(), StageError> {
    let current = build.status;
    if current == next {
        return Ok(());
    }
    if !current.can_become(next) {
        return Err(StageError::new(
            ErrorKind::Internal,
            format!(
                "build {} cannot move from {} to {}",
                build.id,
                current.as_str(),
                next.as_str()
            ),
        ));
    }
    build.status = next;
    ports.store.save_build(build, current).await?;
    // Every status change is announced ("Kiln Image State Change").
    ports
        .events
        .emit(&crate::ports::BuildEvent::of(build))
        .await
}

async fn record(ports: &Ports<'_>, name: &str) -> Result<PipelineRecord, StageError> {
    ports.store.pipeline(name).await?.ok_or_else(|| {
        StageError::new(
            ErrorKind::InvalidPipeline,
            format!("pipeline `{name}` is not applied; run `kiln apply` first"),
        )
    })
}

/// The build as the store has it (fresher than a retried invocation's input).
async fn stored(ports: &Ports<'_>, build: &Build) -> Result<Option<Build>, StageError> {
    ports.store.build(&build.pipeline, &build.id).await
}

/// Fails a `check` that has waited longer than the pipeline allows for the stage.
fn check_deadline(
    ports: &Ports<'_>,
    build: &Build,
    stage: &str,
    minutes: u32,
) -> Result<(), StageError> {
    let Some(started) = build
        .stages
        .get(stage)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.started).ok())
    else {
        return Ok(());
    };
    let waited = ports.clock.now() - started.with_timezone(&chrono::Utc);
    if waited > chrono::Duration::minutes(i64::from(minutes)) {
        return Err(StageError::new(
            ErrorKind::Timeout,
            format!("{stage} took longer than {minutes} minutes"),
        ));
    }
    Ok(())
}
