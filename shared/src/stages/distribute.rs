//! distribute: per target region (a Map in the state machine) copy the image (client token),
//! wait until available, share it (accounts, organizations, OUs, public), publish its id to SSM,
//! add launch template versions. `finish` marks the build AVAILABLE, releases the lock and
//! emits the event.

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildStatus, RegionImage, RegionState};
use crate::model::pipeline::{render_name, Distribution, NameContext};
use crate::ports::{build_tags, CopySpec, ImageState, PipelineRecord, Ports};

use super::{check_deadline, record, stage_finished, stage_started, transition};

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

/// The image a region's entry holds (its copy, or in the build region the image itself).
fn image_of(entry: &RegionImage) -> Result<crate::model::build::ImageId, StageError> {
    entry
        .image
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "no image for the region"))
}

/// Ready (state Available) once the copy is available: what the copies beside the test wait
/// for, and the first half of [`check`]. Nothing is shared or published here.
async fn copied(ports: &Ports<'_>, mut entry: RegionImage) -> Result<RegionImage, StageError> {
    if entry.state != RegionState::Copying {
        return Ok(entry);
    }
    let image = image_of(&entry)?;
    match ports.compute.image_state(&entry.region, &image).await? {
        ImageState::Pending => {}
        ImageState::Failed(why) => {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!("copy of the image to {} failed: {why}", entry.region),
            ))
        }
        ImageState::Available => entry.state = RegionState::Available,
    }
    Ok(entry)
}

/// The target regions, before the copies start beside the test, and the stage started (its
/// timeout counts from the copies' start). The build is not saved: the test stage owns the
/// record until it has passed, and saves it with this.
pub async fn plan(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
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
    Ok(build)
}

/// The copies beside the test: every target region's entry, and whether all are available.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Copies {
    pub regions: Vec<RegionImage>,
    pub ready: bool,
}

/// Starts the copy to every target region (client tokens: a retried start copies nothing twice).
pub async fn start_copies(ports: &Ports<'_>, build: &Build) -> Result<Copies, StageError> {
    let mut regions = Vec::new();
    for r in &build.regions {
        regions.push(start(ports, build, &r.region).await?);
    }
    Ok(Copies {
        regions,
        ready: false,
    })
}

/// Checks every copy still in flight; ready once all are available.
pub async fn await_copies(
    ports: &Ports<'_>,
    build: &Build,
    regions: Vec<RegionImage>,
) -> Result<Copies, StageError> {
    let mut out = Vec::new();
    for entry in regions {
        out.push(copied(ports, entry).await?);
    }
    let ready = out.iter().all(|r| r.state != RegionState::Copying);
    if !ready {
        let record = record(ports, &build.pipeline).await?;
        check_deadline(
            ports,
            build,
            STAGE,
            record.pipeline.timeouts.distribute_minutes,
        )?;
    }
    Ok(Copies {
        regions: out,
        ready,
    })
}

/// Ready (state Shared) once the copy is available and shared and published.
pub async fn check(
    ports: &Ports<'_>,
    build: &Build,
    entry: RegionImage,
) -> Result<RegionImage, StageError> {
    if entry.state == RegionState::Shared {
        return Ok(entry);
    }
    let record = record(ports, &build.pipeline).await?;
    let d = target(&record, &entry.region)?;
    let mut entry = copied(ports, entry).await?;
    if entry.state != RegionState::Available {
        return Ok(entry);
    }
    let image = image_of(&entry)?;
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
pub async fn begin(ports: &Ports<'_>, build: Build) -> Result<Build, StageError> {
    let mut build = plan(ports, build).await?;
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
