//! snapshot: stop the builder, create the image (name template, tags on image and snapshots),
//! wait until it is available, terminate the builder.

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Awaited, Build, BuildStatus};
use crate::model::pipeline::{render_name, NameContext};
use crate::ports::{build_tags, ImageState, InstanceState, Ports};

use super::{check_deadline, record, stage_finished, stage_started, transition};

const STAGE: &str = "snapshot";

pub async fn start(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    build.ready = false;
    stage_started(ports, &mut build, STAGE);
    transition(ports, &mut build, BuildStatus::Snapshotting).await?;
    let builder = build
        .builder
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "the build has no builder instance"))?;
    if build.image.is_none() {
        ports.compute.stop(&build.home_region, &builder.id).await?;
    }
    Ok(build)
}

pub async fn check(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    let record = record(ports, &build.pipeline).await?;
    let region = build.home_region.clone();
    let builder = build
        .builder
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "the build has no builder instance"))?;
    build.ready = false;
    build.awaiting = None;
    match build.image.clone() {
        None => {
            // Look the image up by tag first: a retried check must not create a second one.
            let existing = ports
                .compute
                .images_of(&region, &build.id)
                .await?
                .into_iter()
                .next();
            let image = match existing {
                Some(i) => Some(i),
                None => match ports.compute.instance_state(&region, &builder.id).await? {
                    InstanceState::Stopped => {
                        let home = record
                            .pipeline
                            .distribution
                            .iter()
                            .find(|d| d.region == region);
                        let template = home
                            .unwrap_or(&record.pipeline.distribution[0])
                            .ami_name
                            .clone();
                        let ctx = NameContext {
                            pipeline: &build.pipeline,
                            version: &build.definition_version,
                            build_number: build.build_number,
                            build_date: &build.build_date,
                        };
                        let name = render_name(&template, &ctx)
                            .map_err(|e| StageError::new(ErrorKind::InvalidPipeline, e))?;
                        // The build region's distribution tags, at creation, on the image and
                        // its snapshots (as a copy gets them in the other regions); kiln's own
                        // tags over any of the same keys.
                        let mut tags = home.map(|d| d.tags.clone()).unwrap_or_default();
                        tags.extend(build_tags(&build));
                        tags.insert("Name".into(), name.clone());
                        build.image_name = Some(name.clone());
                        Some(
                            ports
                                .compute
                                .create_image(&region, &builder.id, &name, &tags)
                                .await?,
                        )
                    }
                    InstanceState::Stopping | InstanceState::Running | InstanceState::Pending => {
                        build.awaiting = Some(Awaited::stopped(&region, &builder.id));
                        None
                    }
                    InstanceState::Terminated => {
                        return Err(StageError::new(
                            ErrorKind::Internal,
                            format!(
                                "builder {} terminated before its image was created",
                                builder.id
                            ),
                        ))
                    }
                },
            };
            if let Some(i) = image {
                build.awaiting = Some(Awaited::image(&region, &i));
                build.image = Some(i);
                ports
                    .store
                    .save_build(&build, BuildStatus::Snapshotting)
                    .await?;
            }
        }
        Some(image) => match ports.compute.image_state(&region, &image).await? {
            ImageState::Available => {
                ports.compute.terminate(&region, &builder.id).await?;
                build.ready = true;
                stage_finished(ports, &mut build, STAGE);
                ports
                    .store
                    .save_build(&build, BuildStatus::Snapshotting)
                    .await?;
            }
            ImageState::Pending => build.awaiting = Some(Awaited::image(&region, &image)),
            ImageState::Failed(why) => {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!("image {image} failed: {why}"),
                ))
            }
        },
    }
    if !build.ready {
        check_deadline(
            ports,
            &build,
            STAGE,
            record.pipeline.timeouts.snapshot_minutes,
        )?;
    }
    Ok(build)
}
