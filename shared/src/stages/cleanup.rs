//! cleanup: the Catch target of every state. Terminates every instance of the build (recorded
//! or found by tag), removes a partial image and its snapshots in every region, marks the build
//! FAILED or CANCELLED with the failure, releases the lock and emits the event. Idempotent.

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildStatus, FailureContext, TriggerKind};
use crate::ports::{BuildEvent, Ports};

/// Cleans up after a failure of the first operation, which has only the execution input: the
/// build it may have created is found by the request id. `None` when it created none (e.g. the
/// pipeline was locked by another build).
pub async fn run_for_request(
    ports: &Ports<'_>,
    req: &crate::stages::StartRequest,
    error: &str,
    cause: &str,
) -> Result<Option<Build>, StageError> {
    let Some(request_id) = &req.request_id else {
        return Ok(None);
    };
    let found = ports
        .store
        .builds(&req.pipeline)
        .await?
        .into_iter()
        .find(|b| b.request_id.as_ref() == Some(request_id));
    match found {
        Some(b) => run(ports, b, error, cause).await.map(Some),
        None => Ok(None),
    }
}

/// After `disableAfterFailures` consecutive failed builds that the pipeline's own triggers
/// started, the pipeline's schedule and event rules are disabled; returns what the event
/// should say. As Image Builder counts (`AutoDisablePolicy.failureCount`: "consecutive
/// scheduled image pipeline executions"): manual starts neither count nor reset; a start that
/// found the pipeline locked made no build and is not counted; a success, or a new definition
/// version, starts the count again.
async fn failure_policy(
    ports: &Ports<'_>,
    build: &Build,
    record: Option<&crate::ports::PipelineRecord>,
) -> Result<Option<String>, StageError> {
    let Some(limit) = record
        .and_then(|r| r.pipeline.schedule.as_ref())
        .and_then(|s| s.disable_after_failures)
    else {
        return Ok(None);
    };
    if build.trigger.kind == TriggerKind::Manual {
        return Ok(None);
    }
    let current = record.map(|r| r.pipeline.version.as_str());
    let mut builds = ports.store.builds(&build.pipeline).await?;
    builds.sort_by(|a, b| b.id.0.cmp(&a.id.0));
    let streak = builds
        .iter()
        .filter(|b| b.trigger.kind != TriggerKind::Manual)
        .filter(|b| b.status != BuildStatus::Skipped && b.status.is_final())
        .take_while(|b| Some(b.definition_version.as_str()) == current)
        .take_while(|b| b.status == BuildStatus::Failed)
        .count();
    if streak < limit as usize {
        return Ok(None);
    }
    let reason = format!("{streak} consecutive failed builds (disableAfterFailures: {limit})");
    Ok(ports
        .triggers
        .disable(&build.pipeline, &reason)
        .await?
        .then(|| format!("schedule disabled after {reason}")))
}

/// The message inside a Lambda error cause (`{"errorType", "errorMessage"}`), or the cause.
fn plain_cause(cause: &str) -> String {
    serde_json::from_str::<serde_json::Value>(cause)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| cause.to_string())
}

/// Cleans up after `failure` (error type and cause as the state machine caught them).
pub async fn run(
    ports: &Ports<'_>,
    build: Build,
    error: &str,
    cause: &str,
) -> Result<Build, StageError> {
    // Start from the stored record: the state machine's copy may predate the last save.
    let mut build = ports
        .store
        .build(&build.pipeline, &build.id)
        .await?
        .unwrap_or(build);
    let record = ports.store.pipeline(&build.pipeline).await?;
    let mut regions: Vec<String> = vec![build.home_region.clone()];
    if let Some(r) = &record {
        regions.extend(r.pipeline.distribution.iter().map(|d| d.region.clone()));
    }
    regions.extend(build.regions.iter().map(|r| r.region.clone()));
    regions.sort();
    regions.dedup();
    let terminate = record
        .as_ref()
        .is_none_or(|r| r.pipeline.infrastructure.terminate_on_failure)
        || error == ErrorKind::Cancelled.error_type();
    let mut instances = build.instances();
    instances.extend(
        ports
            .compute
            .instances_of(&build.home_region, &build.id)
            .await?,
    );
    instances.sort();
    instances.dedup();
    if terminate {
        for i in &instances {
            ports.compute.terminate(&build.home_region, i).await?;
        }
    }
    if build.status != BuildStatus::Available {
        for region in &regions {
            let mut images = ports.compute.images_of(region, &build.id).await?;
            images.extend(
                build
                    .regions
                    .iter()
                    .filter(|r| &r.region == region)
                    .filter_map(|r| r.image.clone()),
            );
            if region == &build.home_region {
                images.extend(build.image.clone());
            }
            images.sort();
            images.dedup();
            for image in &images {
                ports.compute.delete_image(region, image).await?;
            }
        }
    }
    if !build.status.is_final() {
        // The stage that failed: the first, in the order they run, that started and did not
        // finish (the copies start distribute beside the test: while the test runs, a
        // failure counts for the test); else the first that had not started.
        const ORDER: [&str; 5] = ["launch", "customize", "snapshot", "test", "distribute"];
        let unfinished = ORDER
            .iter()
            .find(|s| build.stages.get(**s).is_some_and(|t| t.finished.is_none()));
        let not_started = ORDER.iter().find(|s| !build.stages.contains_key(**s));
        let stage = unfinished
            .or(not_started)
            .map_or_else(|| "distribute".to_string(), |s| (*s).to_string());
        let cancelled = error == ErrorKind::Cancelled.error_type();
        build.failure = Some(FailureContext {
            stage,
            error: error.to_string(),
            message: plain_cause(cause),
        });
        let previous = build.status;
        build.status = if cancelled {
            BuildStatus::Cancelled
        } else {
            BuildStatus::Failed
        };
        ports.store.save_build(&build, previous).await?;
        let mut event = BuildEvent::of(&build);
        if !cancelled {
            event.note = failure_policy(ports, &build, record.as_ref()).await?;
        }
        ports.events.emit(&event).await?;
    }
    ports.store.unlock(&build.pipeline, &build.id).await?;
    build.ready = true;
    Ok(build)
}
