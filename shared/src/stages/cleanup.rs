//! cleanup: the Catch target of every state. Terminates every instance of the build (recorded
//! or found by tag), removes a partial image and its snapshots in every region, marks the build
//! FAILED or CANCELLED with the failure, releases the lock and emits the event. Idempotent.
//!
//! Two fallbacks keep a build from staying BUILDING with its pipeline locked: [`record`], the
//! Catch of the cleanup itself (when EC2 refuses it even after its retries), touches the store
//! only; [`reap`] cleans up after an execution that ended outside kiln's Catch (stopped, timed
//! out, or failed by an error no Catch takes), for the stack's reaper (`aws::reaper`).

use serde::Serialize;

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildId, BuildStatus, FailureContext, TriggerKind};
use crate::ports::{BuildEvent, PipelineRecord, Ports};

/// The build an execution started, found by its request id (the execution's name) in
/// `pipeline`, or in every pipeline when the execution's input did not say which.
pub async fn by_request(
    ports: &Ports<'_>,
    pipeline: Option<&str>,
    request_id: &str,
) -> Result<Option<Build>, StageError> {
    let pipelines = match pipeline {
        Some(p) => vec![p.to_string()],
        None => ports.store.pipeline_names().await?,
    };
    for p in &pipelines {
        let found = ports
            .store
            .builds(p)
            .await?
            .into_iter()
            .find(|b| b.request_id.as_deref() == Some(request_id));
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

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
    match by_request(ports, Some(&req.pipeline), request_id).await? {
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
    record: Option<&PipelineRecord>,
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
        conclude(
            ports,
            &mut build,
            error,
            plain_cause(cause),
            Some(record.as_ref()),
        )
        .await?;
    }
    ports.store.unlock(&build.pipeline, &build.id).await?;
    build.ready = true;
    Ok(build)
}

/// Marks a build that is not final FAILED, or CANCELLED for `Kiln.Cancelled`, with the stage that
/// failed, saves it and emits its event. `policy` holds the pipeline's record when the failure
/// policy is to be applied (it may disable the pipeline's triggers).
async fn conclude(
    ports: &Ports<'_>,
    build: &mut Build,
    error: &str,
    message: String,
    policy: Option<Option<&PipelineRecord>>,
) -> Result<(), StageError> {
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
        message,
    });
    let previous = build.status;
    build.status = if cancelled {
        BuildStatus::Cancelled
    } else {
        BuildStatus::Failed
    };
    ports.store.save_build(build, previous).await?;
    let mut event = BuildEvent::of(build);
    if let (false, Some(record)) = (cancelled, policy) {
        event.note = failure_policy(ports, build, record).await?;
    }
    ports.events.emit(&event).await
}

/// The Catch of the cleanup itself: the cleanup failed even after its retries (EC2 refusing
/// TerminateInstances, say), so only the store is touched — the build marked FAILED (CANCELLED
/// for `Kiln.Cancelled`) with the original failure and the cleanup's, which names what may
/// still run, and the lock released. The build never stays BUILDING with its pipeline locked
/// because its cleanup failed; the reaper retries the EC2 work once the execution has ended.
pub async fn record(
    ports: &Ports<'_>,
    build: Build,
    error: &str,
    cause: &str,
    cleanup_error: &str,
    cleanup_cause: &str,
) -> Result<Build, StageError> {
    let mut build = ports
        .store
        .build(&build.pipeline, &build.id)
        .await?
        .unwrap_or(build);
    if !build.status.is_final() {
        let left: Vec<String> = build.instances().into_iter().map(|i| i.0).collect();
        let left = if left.is_empty() {
            String::new()
        } else {
            format!("; instances {} may still run", left.join(", "))
        };
        let message = format!(
            "{}; then the cleanup failed ({cleanup_error}: {}){left}",
            plain_cause(cause),
            plain_cause(cleanup_cause)
        );
        // No failure policy: it calls EventBridge and the scheduler, and this step must not
        // depend on more than the store.
        conclude(ports, &mut build, error, message, None).await?;
    }
    ports.store.unlock(&build.pipeline, &build.id).await?;
    build.ready = true;
    Ok(build)
}

/// [`record`] after the cleanup of the first operation failed: the build found by request id.
pub async fn record_for_request(
    ports: &Ports<'_>,
    req: &crate::stages::StartRequest,
    caught: (&str, &str),
    cleanup: (&str, &str),
) -> Result<Option<Build>, StageError> {
    let Some(request_id) = &req.request_id else {
        return Ok(None);
    };
    match by_request(ports, Some(&req.pipeline), request_id).await? {
        Some(b) => record(ports, b, caught.0, caught.1, cleanup.0, cleanup.1)
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// What [`reap`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reaped {
    /// The execution's build; `None` when it recorded none (stopped before the start did).
    pub build: Option<BuildId>,
    /// Its status before, and after.
    pub was: Option<BuildStatus>,
    pub now: Option<BuildStatus>,
    /// The build was not final and this call ended it (a repeated call finds it final).
    pub concluded: bool,
}

/// Cleans up the build of an execution that ended outside kiln's Catch — stopped, timed out,
/// or failed by an error no Catch takes (States.DataLimitExceeded, States.Runtime): a build
/// that is not final gets the cleanup the Catch would have run, with `error` and `cause`
/// (`Kiln.Cancelled` makes it CANCELLED). A FAILED or CANCELLED build gets the EC2 work again
/// (after a cleanup that failed, [`record`] left it undone; otherwise there is nothing left and
/// nothing changes); an AVAILABLE or SKIPPED one only its lock released, if it still holds it.
/// Idempotent: a repeated call changes nothing.
pub async fn reap(
    ports: &Ports<'_>,
    pipeline: Option<&str>,
    request_id: &str,
    error: &str,
    cause: &str,
) -> Result<Reaped, StageError> {
    let Some(build) = by_request(ports, pipeline, request_id).await? else {
        return Ok(Reaped {
            build: None,
            was: None,
            now: None,
            concluded: false,
        });
    };
    let was = build.status;
    let (id, name) = (build.id.clone(), build.pipeline.clone());
    let now = match was {
        BuildStatus::Available | BuildStatus::Skipped => {
            ports.store.unlock(&name, &id).await?;
            was
        }
        // Ended already: what to terminate follows the build's own failure, not the event's.
        BuildStatus::Failed | BuildStatus::Cancelled => {
            let failure = build.failure.clone().unwrap_or_else(|| FailureContext {
                stage: String::new(),
                error: error.to_string(),
                message: cause.to_string(),
            });
            run(ports, build, &failure.error, &failure.message)
                .await?
                .status
        }
        _ => run(ports, build, error, cause).await?.status,
    };
    Ok(Reaped {
        build: Some(id),
        was: Some(was),
        now: Some(now),
        concluded: !was.is_final(),
    })
}
