//! distribute: per target region (a Map in the state machine) copy the image (client token),
//! wait until available, share it (accounts, organizations, OUs, public), publish its id to SSM,
//! add launch template versions. `finish` marks the build AVAILABLE, releases the lock and
//! emits the event.

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildStatus, RegionImage, RegionState};
use crate::model::pipeline::{render_name, Distribution, NameContext};
use crate::ports::{build_tags, CopySpec, ImageState, PipelineRecord, Ports};

use super::{record, stage_finished, stage_started, transition};

const STAGE: &str = "distribute";

fn target<'r>(record: &'r PipelineRecord, region: &str) -> Result<&'r Distribution, StageError> {
    record
        .pipeline
        .distribution
        .iter()
        .find(|d| d.region == region)
        .ok_or_else(|| {
            StageError::new(
                ErrorKind::InvalidPipeline,
                format!("region {region} is not a distribution target"),
            )
        })
}

/// Starts distribution to one region; returns that region's entry.
pub async fn start(
    ports: &Ports<'_>,
    build: &Build,
    region: &str,
) -> Result<RegionImage, StageError> {
    let record = record(ports, &build.pipeline).await?;
    let d = target(&record, region)?;
    let image = build.image.clone().ok_or_else(|| {
        StageError::new(ErrorKind::Internal, "the build has no image to distribute")
    })?;
    if region == build.home_region {
        return Ok(RegionImage {
            region: region.into(),
            image: Some(image),
            state: RegionState::Copying,
        });
    }
    let ctx = NameContext {
        pipeline: &build.pipeline,
        version: &build.definition_version,
        build_number: build.build_number,
        build_date: &build.build_date,
    };
    let name = render_name(&d.ami_name, &ctx)
        .map_err(|e| StageError::new(ErrorKind::InvalidPipeline, e))?;
    let mut tags = d.tags.clone();
    tags.extend(build_tags(build));
    let copy = ports
        .compute
        .copy_image(
            &build.home_region,
            &image,
            region,
            CopySpec {
                name: &name,
                client_token: &build.id.token(&format!("copy-{region}")),
                tags: &tags,
                kms_key_id: d.kms_key_id.as_deref(),
            },
        )
        .await?;
    Ok(RegionImage {
        region: region.into(),
        image: Some(copy),
        state: RegionState::Copying,
    })
}

/// Ready (state Shared) once the copy is available and shared and published.
pub async fn check(
    ports: &Ports<'_>,
    build: &Build,
    mut entry: RegionImage,
) -> Result<RegionImage, StageError> {
    if entry.state == RegionState::Shared {
        return Ok(entry);
    }
    let record = record(ports, &build.pipeline).await?;
    let d = target(&record, &entry.region)?;
    let image = entry
        .image
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "no image for the region"))?;
    match ports.compute.image_state(&entry.region, &image).await? {
        ImageState::Pending => return Ok(entry),
        ImageState::Failed(why) => {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!("copy of the image to {} failed: {why}", entry.region),
            ))
        }
        ImageState::Available => {}
    }
    if let Some(lp) = &d.launch_permission {
        ports.compute.share_image(&entry.region, &image, lp).await?;
    }
    if let Some(param) = &d.ssm_parameter {
        ports
            .parameters
            .put(&entry.region, param, image.as_str())
            .await?;
    }
    for lt in &d.launch_templates {
        ports
            .compute
            .new_launch_template_version(&entry.region, &lt.id, &image, lt.set_default_version)
            .await?;
    }
    entry.state = RegionState::Shared;
    Ok(entry)
}

/// Marks the stage started and lists the target regions (the state machine maps over them).
pub async fn begin(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    let record = record(ports, &build.pipeline).await?;
    if build.regions.is_empty() {
        build.regions = record
            .pipeline
            .distribution
            .iter()
            .map(|d| RegionImage {
                region: d.region.clone(),
                image: None,
                state: RegionState::Copying,
            })
            .collect();
    }
    stage_started(ports, &mut build, STAGE);
    transition(ports, &mut build, BuildStatus::Distributing).await?;
    Ok(build)
}

/// After every region: AVAILABLE, lock released, event emitted.
pub async fn finish(
    ports: &Ports<'_>,
    mut build: Build,
    regions: Vec<RegionImage>,
) -> Result<Build, StageError> {
    if let Some(r) = regions.iter().find(|r| r.state != RegionState::Shared) {
        return Err(StageError::new(
            ErrorKind::Internal,
            format!("region {} is not distributed yet", r.region),
        ));
    }
    build.regions = regions;
    stage_finished(ports, &mut build, STAGE);
    transition(ports, &mut build, BuildStatus::Available).await?;
    ports.store.unlock(&build.pipeline, &build.id).await?;
    build.ready = true;
    Ok(build)
}
