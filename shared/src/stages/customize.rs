//! customize: one command on the builder runs the build and validate phases of every component
//! in order. `check` turns the agent's report into a clear failure.

use crate::component::PhaseName;
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Awaited, Build, BuildStatus};
use crate::ports::{CommandPlan, CommandStatus, Ports};

use super::{check_deadline, record, stage_finished, stage_started};

const STAGE: &str = "customize";

pub async fn start(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    build.ready = false;
    if build.customize_command.is_none() {
        // A retried invocation whose first attempt sent the command: the store knows it.
        build.customize_command = super::stored(ports, &build)
            .await?
            .and_then(|b| b.customize_command);
    }
    if build.customize_command.is_some() {
        return Ok(build);
    }
    let record = record(ports, &build.pipeline).await?;
    let builder = build
        .builder
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "the build has no builder instance"))?;
    stage_started(ports, &mut build, STAGE);
    let plan = CommandPlan {
        build: build.id.clone(),
        phases: vec![PhaseName::Build, PhaseName::Validate],
        components: record.components.clone(),
        working_directory: record.pipeline.working_directory.clone(),
        sanitize: record.pipeline.sanitize.0.clone(),
        verify_clean: None,
        timeout_minutes: record.pipeline.timeouts.customize_minutes,
    };
    build.customize_command = Some(
        ports
            .commands
            .send(&build.home_region, &builder.id, &plan)
            .await?,
    );
    ports
        .store
        .save_build(&build, BuildStatus::Building)
        .await?;
    Ok(build)
}

pub async fn check(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    let record = record(ports, &build.pipeline).await?;
    let (builder, command) = match (&build.builder, &build.customize_command) {
        (Some(b), Some(c)) => (b.clone(), c.clone()),
        _ => {
            return Err(StageError::new(
                ErrorKind::Internal,
                "customize has not started",
            ))
        }
    };
    build.awaiting = None;
    match ports
        .commands
        .status(&build.home_region, &builder.id, &command)
        .await?
    {
        CommandStatus::InProgress => {
            build.ready = false;
            build.awaiting = Some(Awaited::command(&build.home_region, &builder.id, &command));
            check_deadline(
                ports,
                &build,
                STAGE,
                record.pipeline.timeouts.customize_minutes,
            )?;
        }
        CommandStatus::Success => {
            build.ready = true;
            stage_finished(ports, &mut build, STAGE);
            ports
                .store
                .save_build(&build, BuildStatus::Building)
                .await?;
        }
        CommandStatus::Failed {
            message,
            output_tail,
        } => {
            return Err(StageError::new(
                ErrorKind::ComponentFailed,
                format!("{message}\n{output_tail}").trim_end().to_string(),
            ));
        }
    }
    Ok(build)
}
