//! test: launch a fresh instance from the new image, run the test phase of the test components
//! there, terminate it. Skipped when the pipeline disables tests or has none.

use crate::component::PhaseName;
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Awaited, Build, BuildStatus, InstanceRef};
use crate::ports::{build_tags, CommandPlan, CommandStatus, InstanceState, LaunchSpec, Ports};

use super::{check_deadline, record, stage_finished, stage_started, transition};

const STAGE: &str = "test";

pub async fn start(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    let record = record(ports, &build.pipeline).await?;
    let p = &record.pipeline;
    build.ready = false;
    if !p.tests.enabled || record.tests.is_empty() {
        build.ready = true;
        return Ok(build);
    }
    stage_started(ports, &mut build, STAGE);
    transition(ports, &mut build, BuildStatus::Testing).await?;
    if build.test_instance.is_none() {
        let image = build.image.clone().ok_or_else(|| {
            StageError::new(ErrorKind::Internal, "the build has no image to test")
        })?;
        let instance_type = p
            .tests
            .instance_type
            .clone()
            .unwrap_or_else(|| p.infrastructure.instance_types[0].clone());
        let mut tags = p.infrastructure.tags.clone();
        tags.extend(build_tags(&build));
        tags.insert("Name".into(), format!("kiln-test-{}", p.name));
        let spec = LaunchSpec {
            region: build.home_region.clone(),
            image,
            instance_type: instance_type.clone(),
            client_token: build.id.token("test"),
            tags,
            infrastructure: p.infrastructure.clone(),
            block_devices: Vec::new(),
            user_data: None,
            terminate_on_shutdown: true,
        };
        let id = ports.compute.launch(&spec).await?;
        build.test_instance = Some(InstanceRef { id, instance_type });
        ports.store.save_build(&build, BuildStatus::Testing).await?;
    }
    Ok(build)
}

pub async fn check(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    let record = record(ports, &build.pipeline).await?;
    let region = build.home_region.clone();
    let Some(instance) = build.test_instance.clone() else {
        build.ready = true;
        return Ok(build);
    };
    build.ready = false;
    build.awaiting = None;
    if build.test_command.is_none() {
        // A retried invocation whose first attempt sent the command: the store knows it.
        build.test_command = super::stored(ports, &build)
            .await?
            .and_then(|b| b.test_command);
    }
    match build.test_command.clone() {
        None => {
            let state = ports.compute.instance_state(&region, &instance.id).await?;
            if state == InstanceState::Pending {
                build.awaiting = Some(Awaited::running(&region, &instance.id));
            }
            if state == InstanceState::Running
                && ports.commands.agent_online(&region, &instance.id).await?
            {
                let plan = CommandPlan {
                    build: build.id.clone(),
                    phases: vec![PhaseName::Test],
                    components: record.tests.clone(),
                    working_directory: record.pipeline.working_directory.clone(),
                    sanitize: Vec::new(),
                    verify_clean: Some(record.pipeline.sanitize.0.clone()),
                    timeout_minutes: record.pipeline.timeouts.test_minutes,
                };
                build.test_command = Some(ports.commands.send(&region, &instance.id, &plan).await?);
                ports.store.save_build(&build, BuildStatus::Testing).await?;
            }
        }
        Some(command) => match ports
            .commands
            .status(&region, &instance.id, &command)
            .await?
        {
            CommandStatus::InProgress => {
                build.awaiting = Some(Awaited::command(&region, &instance.id, &command));
            }
            CommandStatus::Success => {
                ports.compute.terminate(&region, &instance.id).await?;
                build.ready = true;
                stage_finished(ports, &mut build, STAGE);
                ports.store.save_build(&build, BuildStatus::Testing).await?;
            }
            CommandStatus::Failed {
                message,
                output_tail,
            } => {
                return Err(StageError::new(
                    ErrorKind::TestFailed,
                    format!("{message}\n{output_tail}").trim_end().to_string(),
                ));
            }
        },
    }
    if !build.ready {
        check_deadline(ports, &build, STAGE, record.pipeline.timeouts.test_minutes)?;
    }
    Ok(build)
}
