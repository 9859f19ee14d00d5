//! launch-builder: resolve the parent image, decide skip, take the lock, record the build and
//! launch the builder (instance types in order on capacity errors). `check`: running and the
//! command channel online.

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Awaited, Build, BuildId, BuildStatus, ImageId, InstanceRef};
use crate::model::fingerprint;
use crate::model::pipeline::{BlockDevice, Parent, StartCondition};
use crate::ports::{
    build_tags, ImageFacts, ImageState, InstanceState, LaunchSpec, PipelineRecord, Ports,
};

use super::{check_deadline, record, stage_finished, stage_started, StartRequest};

const STAGE: &str = "launch";

/// Resolves the parent image the pipeline names, at build time.
pub async fn resolve_parent(
    ports: &Ports<'_>,
    record: &PipelineRecord,
    region: &str,
) -> Result<ImageId, StageError> {
    let not_found = |what: String| StageError::new(ErrorKind::InvalidPipeline, what);
    match &record.pipeline.parent {
        Parent::Ami(id) => Ok(ImageId(id.clone())),
        Parent::SsmParameter(name) => ports
            .parameters
            .get(region, name)
            .await?
            .map(ImageId)
            .ok_or_else(|| not_found(format!("SSM parameter `{name}` does not exist in {region}"))),
        Parent::Filter(f) => ports.compute.latest_image(region, f).await?.ok_or_else(|| {
            not_found(format!(
                "no image in {region} matches owners {:?} and name `{}`",
                f.owners, f.name
            ))
        }),
        Parent::Local(name) => ports
            .compute
            .image_named(region, name)
            .await?
            .ok_or_else(|| not_found(format!("no embedded image `{name}`; see `kiln image list`"))),
    }
}

/// Starts a build: the first operation of an execution.
pub async fn start(ports: &Ports<'_>, req: &StartRequest) -> Result<Build, StageError> {
    let record = record(ports, &req.pipeline).await?;
    let p = &record.pipeline;
    let region = p.home_region().to_string();
    let builds = ports.store.builds(&p.name).await?;
    // A retried invocation continues the build it created.
    if let Some(existing) = req
        .request_id
        .as_ref()
        .and_then(|r| builds.iter().find(|b| b.request_id.as_ref() == Some(r)))
    {
        let mut build = existing.clone();
        if build.status == BuildStatus::Pending
            || (build.status == BuildStatus::Building && build.builder.is_none())
        {
            launch(ports, &record, &mut build).await?;
        }
        return Ok(build);
    }
    let parent = resolve_parent(ports, &record, &region).await?;
    let fp = fingerprint::of_record(&record, parent.as_str());
    let now = ports.clock.now();
    let mut build = Build {
        id: BuildId::new_at(now.timestamp_millis().max(0) as u64),
        pipeline: p.name.clone(),
        definition_version: p.version.clone(),
        // A skipped run makes no image, so it takes no build number.
        build_number: builds
            .iter()
            .filter(|b| b.definition_version == p.version && b.status != BuildStatus::Skipped)
            .map(|b| b.build_number)
            .max()
            .unwrap_or(0)
            + 1,
        trigger: req.trigger.clone(),
        request_id: req.request_id.clone(),
        status: BuildStatus::Pending,
        home_region: region.clone(),
        fingerprint: Some(fp.clone()),
        parent_image: Some(parent),
        builder: None,
        customize_command: None,
        image: None,
        image_name: None,
        test_instance: None,
        test_command: None,
        regions: Vec::new(),
        stages: Default::default(),
        ready: false,
        awaiting: None,
        failure: None,
        build_date: now.format("%Y%m%d%H%M%S").to_string(),
    };
    // onChange: nothing that determines the image changed since the last available build.
    if p.start_condition() == StartCondition::OnChange
        && builds
            .iter()
            .any(|b| b.status == BuildStatus::Available && b.fingerprint.as_ref() == Some(&fp))
    {
        build.status = BuildStatus::Skipped;
        build.ready = true;
        ports.store.create_build(&build).await?;
        ports
            .events
            .emit(&crate::ports::BuildEvent::of(&build))
            .await?;
        return Ok(build);
    }
    let ttl = i64::from(
        p.timeouts.launch_minutes
            + p.timeouts.customize_minutes
            + p.timeouts.snapshot_minutes
            + p.timeouts.test_minutes
            + p.timeouts.distribute_minutes,
    ) * 60;
    ports.store.lock(&p.name, &build.id, now, ttl).await?;
    if let Err(e) = ports.store.create_build(&build).await {
        ports.store.unlock(&p.name, &build.id).await?;
        return Err(e);
    }
    launch(ports, &record, &mut build).await?;
    Ok(build)
}

/// The parent is described before anything launches: it exists in the build's region, is
/// available, and every instance type of the pipeline runs its architecture.
async fn check_parent(
    ports: &Ports<'_>,
    record: &PipelineRecord,
    region: &str,
    parent: &ImageId,
) -> Result<ImageFacts, StageError> {
    let invalid = |what: String| StageError::new(ErrorKind::InvalidPipeline, what);
    let from = match &record.pipeline.parent {
        Parent::Ami(_) => "parent.ami".to_string(),
        Parent::SsmParameter(name) => format!("parent.ssmParameter {name}"),
        Parent::Filter(_) => "parent.filter".to_string(),
        Parent::Local(name) => format!("parent.local {name}"),
    };
    let Some(facts) = ports.compute.describe_image(region, parent).await? else {
        return Err(invalid(format!(
            "the parent image {parent} ({from}) does not exist in {region}, or this account cannot use it"
        )));
    };
    let unavailable = match &facts.state {
        ImageState::Available => None,
        ImageState::Pending => Some("pending".to_string()),
        ImageState::Failed(why) => Some(why.clone()),
    };
    if let Some(why) = unavailable {
        return Err(invalid(format!(
            "the parent image {parent} ({from}) is not available in {region}: {why}"
        )));
    }
    let types = &record.pipeline.infrastructure.instance_types;
    let supported = ports.compute.instance_architectures(region, types).await?;
    let misfits: Vec<&str> = types
        .iter()
        .filter(|t| {
            supported
                .get(*t)
                .is_some_and(|arches| !arches.contains(&facts.architecture))
        })
        .map(String::as_str)
        .collect();
    if !misfits.is_empty() {
        return Err(invalid(format!(
            "the parent image {parent} ({from}) is {}, which instance type{} {} cannot run; choose types of that architecture in infrastructure.instanceTypes",
            facts.architecture,
            if misfits.len() == 1 { "" } else { "s" },
            misfits.join(", ")
        )));
    }
    Ok(facts)
}

/// The builder's volumes: the pipeline's, and the parent's root device encrypted (with the
/// account's default EBS key, at the parent's size) when the pipeline does not name it, so that
/// every image kiln makes is encrypted. The parent's other mappings stay as EC2 keeps them.
pub fn merge_block_devices(pipeline: &[BlockDevice], root: Option<&str>) -> Vec<BlockDevice> {
    let mut merged = pipeline.to_vec();
    if let Some(root) = root {
        if !merged.iter().any(|d| d.device_name == root) {
            merged.insert(
                0,
                BlockDevice {
                    device_name: root.to_string(),
                    volume_size: None,
                    volume_type: None,
                    iops: None,
                    throughput: None,
                    encrypted: true,
                    kms_key_id: None,
                    delete_on_termination: true,
                },
            );
        }
    }
    merged
}

/// Launches the builder, trying instance types in order on capacity errors.
async fn launch(
    ports: &Ports<'_>,
    record: &PipelineRecord,
    build: &mut Build,
) -> Result<(), StageError> {
    let p = &record.pipeline;
    stage_started(ports, build, STAGE);
    super::transition(ports, build, BuildStatus::Building).await?;
    let parent = build
        .parent_image
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "the build has no parent image"))?;
    let facts = check_parent(ports, record, &build.home_region, &parent).await?;
    let block_devices = merge_block_devices(&p.block_devices, facts.root_device.as_deref());
    let mut tags = p.infrastructure.tags.clone();
    tags.extend(build_tags(build));
    tags.insert("Name".into(), format!("kiln-builder-{}", p.name));
    let mut last = None;
    for instance_type in &p.infrastructure.instance_types {
        let spec = LaunchSpec {
            region: build.home_region.clone(),
            image: parent.clone(),
            instance_type: instance_type.clone(),
            client_token: build.id.token(&format!("builder-{instance_type}")),
            tags: tags.clone(),
            infrastructure: p.infrastructure.clone(),
            block_devices: block_devices.clone(),
            user_data: p.user_data.clone(),
            terminate_on_shutdown: false,
        };
        match ports.compute.launch(&spec).await {
            Ok(id) => {
                build.builder = Some(InstanceRef {
                    id,
                    instance_type: instance_type.clone(),
                });
                ports.store.save_build(build, BuildStatus::Building).await?;
                return Ok(());
            }
            Err(e) if e.kind == ErrorKind::Capacity => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last
        .map(|e| {
            StageError::new(
                ErrorKind::Capacity,
                format!(
                    "no capacity for any of {}: {e}",
                    p.infrastructure.instance_types.join(", ")
                ),
            )
        })
        .unwrap_or_else(|| StageError::new(ErrorKind::InvalidPipeline, "no instance types")))
}

/// Ready when the builder runs and its command channel is online.
pub async fn check(ports: &Ports<'_>, mut build: Build) -> Result<Build, StageError> {
    if build.status == BuildStatus::Skipped {
        build.ready = true;
        return Ok(build);
    }
    let record = record(ports, &build.pipeline).await?;
    let builder = build
        .builder
        .clone()
        .ok_or_else(|| StageError::new(ErrorKind::Internal, "the build has no builder instance"))?;
    build.awaiting = None;
    build.ready = match ports
        .compute
        .instance_state(&build.home_region, &builder.id)
        .await?
    {
        InstanceState::Running => {
            ports
                .commands
                .agent_online(&build.home_region, &builder.id)
                .await?
        }
        InstanceState::Pending => {
            build.awaiting = Some(Awaited::running(&build.home_region, &builder.id));
            false
        }
        other => {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!("builder {} is {other:?} before customization", builder.id),
            ))
        }
    };
    if build.ready {
        stage_finished(ports, &mut build, STAGE);
        ports
            .store
            .save_build(&build, BuildStatus::Building)
            .await?;
    } else {
        check_deadline(
            ports,
            &build,
            STAGE,
            record.pipeline.timeouts.launch_minutes,
        )?;
    }
    Ok(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, kms: Option<&str>) -> BlockDevice {
        BlockDevice {
            device_name: name.into(),
            volume_size: Some(30),
            volume_type: None,
            iops: None,
            throughput: None,
            encrypted: true,
            kms_key_id: kms.map(str::to_string),
            delete_on_termination: true,
        }
    }

    #[test]
    fn the_parents_root_is_encrypted_unless_the_pipeline_names_it() {
        // Nothing named: the parent's root, encrypted at the parent's size.
        let merged = merge_block_devices(&[], Some("/dev/sda1"));
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].device_name, "/dev/sda1");
        assert!(merged[0].encrypted && merged[0].volume_size.is_none());
        // The root named: the pipeline's entry alone.
        let named = [device("/dev/xvda", Some("alias/k"))];
        assert_eq!(
            merge_block_devices(&named, Some("/dev/xvda")),
            named.to_vec()
        );
        // A data volume named: kept, and the root added before it.
        let data = [device("/dev/sdf", None)];
        let merged = merge_block_devices(&data, Some("/dev/xvda"));
        let names: Vec<&str> = merged.iter().map(|d| d.device_name.as_str()).collect();
        assert_eq!(names, ["/dev/xvda", "/dev/sdf"]);
        // No EBS root (instance store, embedded images): the pipeline's as written.
        assert_eq!(merge_block_devices(&data, None), data.to_vec());
    }
}
