//! Compute over EC2: instances and images, every mutating call tagged with the build and
//! idempotent through client tokens or look-ups by tag.

use std::collections::BTreeMap;

use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceStateName,
    InstanceType, LaunchPermission as Ec2LaunchPermission, LaunchPermissionModifications,
    RequestLaunchTemplateData, ResourceType, ShutdownBehavior, Tag, TagSpecification,
    VolumeType as Ec2VolumeType,
};

use super::{sdk_error, AwsPorts};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{BuildId, ImageId, InstanceId};
use crate::model::pipeline::{Imdsv2, LaunchPermission, ParentFilter, VolumeType};
use crate::ports::{
    Compute, CopySpec, ImageFacts, ImageState, InstanceState, LaunchSpec, PortResult,
};

fn tag_list(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(kind: ResourceType, tags: &BTreeMap<String, String>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tag_list(tags)))
        .build()
}

fn volume_type(v: VolumeType) -> Ec2VolumeType {
    match v {
        VolumeType::Gp2 => Ec2VolumeType::Gp2,
        VolumeType::Gp3 => Ec2VolumeType::Gp3,
        VolumeType::Io1 => Ec2VolumeType::Io1,
        VolumeType::Io2 => Ec2VolumeType::Io2,
        VolumeType::St1 => Ec2VolumeType::St1,
        VolumeType::Sc1 => Ec2VolumeType::Sc1,
        VolumeType::Standard => Ec2VolumeType::Standard,
    }
}

fn build_filter(build: &BuildId) -> Filter {
    Filter::builder()
        .name("tag:kiln:build-id")
        .values(build.as_str())
        .build()
}

impl AwsPorts {
    /// A build's tags plus this stack's `kiln:stack` tag (when the ports run in a stack).
    fn stack_tags(&self, tags: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut all = tags.clone();
        if let Some(stack) = &self.settings.stack {
            all.insert(super::STACK_TAG.to_string(), stack.clone());
        }
        all
    }

    /// The EBS snapshots an image's block device mappings name; None when the image is gone.
    async fn snapshots_of(
        &self,
        region: &str,
        image: &ImageId,
    ) -> Result<Option<Vec<String>>, StageError> {
        match self
            .ec2(region)
            .describe_images()
            .image_ids(image.as_str())
            .send()
            .await
        {
            Ok(out) => Ok(Some(
                out.images()
                    .iter()
                    .flat_map(|i| i.block_device_mappings())
                    .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()))
                    .map(str::to_string)
                    .collect(),
            )),
            Err(e) if e.code() == Some("InvalidAMIID.NotFound") => Ok(None),
            Err(e) => Err(sdk_error("DescribeImages", e)),
        }
    }

    /// The security group instances get when the pipeline names none: `kiln-<stack>` (or `kiln`)
    /// in the instance's VPC (the subnet's, or the region's default), with no inbound rule and
    /// EC2's default outbound rule, made the first time and kept (one per region and VPC). The
    /// VPC's default group would let every other instance in it reach the builder.
    async fn kiln_security_group(
        &self,
        region: &str,
        subnet: Option<&str>,
    ) -> Result<String, StageError> {
        let ec2 = self.ec2(region);
        let vpc = match subnet {
            Some(subnet) => ec2
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .map_err(|e| sdk_error("DescribeSubnets", e))?
                .subnets()
                .first()
                .and_then(|s| s.vpc_id())
                .map(str::to_string),
            None => ec2
                .describe_vpcs()
                .filters(Filter::builder().name("is-default").values("true").build())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeVpcs", e))?
                .vpcs()
                .first()
                .and_then(|v| v.vpc_id())
                .map(str::to_string),
        };
        let Some(vpc) = vpc else {
            return Err(StageError::new(
                ErrorKind::InvalidPipeline,
                format!("{region} has no default VPC: set infrastructure.subnetId (and securityGroupIds)"),
            ));
        };
        let name = match &self.settings.stack {
            Some(stack) => format!("kiln-{stack}"),
            None => "kiln".to_string(),
        };
        let find = || async {
            let mut filters = vec![
                Filter::builder().name("vpc-id").values(&vpc).build(),
                Filter::builder().name("group-name").values(&name).build(),
            ];
            if let Some(stack) = &self.settings.stack {
                filters.push(
                    Filter::builder()
                        .name(format!("tag:{}", super::STACK_TAG))
                        .values(stack)
                        .build(),
                );
            }
            ec2.describe_security_groups()
                .set_filters(Some(filters))
                .send()
                .await
                .map_err(|e| sdk_error("DescribeSecurityGroups", e))
                .map(|out| {
                    out.security_groups()
                        .first()
                        .and_then(|g| g.group_id())
                        .map(str::to_string)
                })
        };
        if let Some(id) = find().await? {
            return Ok(id);
        }
        let tags = self.stack_tags(&BTreeMap::from([("Name".to_string(), name.clone())]));
        match ec2
            .create_security_group()
            .group_name(&name)
            .description("kiln builders and test instances: no inbound rule")
            .vpc_id(&vpc)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &tags))
            .send()
            .await
        {
            Ok(out) => out.group_id().map(str::to_string).ok_or_else(|| {
                StageError::new(ErrorKind::Internal, "CreateSecurityGroup returned no id")
            }),
            // Another build made it first.
            Err(e) if e.code() == Some("InvalidGroup.Duplicate") => {
                find().await?.ok_or_else(|| {
                    StageError::new(
                        ErrorKind::Retryable,
                        format!("security group {name} is being created"),
                    )
                })
            }
            Err(e) => Err(sdk_error("CreateSecurityGroup", e)),
        }
    }

    /// `filters`, and in a stack the filter that makes look-ups see only what this stack created
    /// (`kiln:stack`): a resource someone else tagged with a build id is neither found nor
    /// touched.
    fn in_stack(&self, mut filters: Vec<Filter>) -> Option<Vec<Filter>> {
        if let Some(stack) = &self.settings.stack {
            filters.push(
                Filter::builder()
                    .name(format!("tag:{}", super::STACK_TAG))
                    .values(stack)
                    .build(),
            );
        }
        Some(filters)
    }
}

impl AwsPorts {
    /// DescribeImages of one image; `None` when EC2 does not know it (or it is malformed).
    async fn describe_one(
        &self,
        region: &str,
        id: &ImageId,
    ) -> Result<Option<aws_sdk_ec2::types::Image>, StageError> {
        match self
            .ec2(region)
            .describe_images()
            .image_ids(id.as_str())
            .send()
            .await
        {
            Ok(o) => Ok(o.images().first().cloned()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("InvalidAMIID.NotFound" | "InvalidAMIID.Malformed")
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(sdk_error("DescribeImages", e)),
        }
    }
}

/// An image's state as kiln's stages read it.
fn state_of(i: &aws_sdk_ec2::types::Image, id: &ImageId) -> ImageState {
    match i.state().map(|s| s.as_str()) {
        Some("available") => ImageState::Available,
        Some("pending") | None => ImageState::Pending,
        Some(other) => ImageState::Failed(format!("image {id} is {other}")),
    }
}

impl Compute for AwsPorts {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId> {
        Box::pin(async move {
            use base64::Engine as _;
            let inf = &spec.infrastructure;
            let tags = &self.stack_tags(&spec.tags);
            let mut req = self
                .ec2(&spec.region)
                .run_instances()
                .image_id(spec.image.as_str())
                .instance_type(InstanceType::from(spec.instance_type.as_str()))
                .min_count(1)
                .max_count(1)
                .client_token(&spec.client_token)
                .tag_specifications(tag_spec(ResourceType::Instance, tags))
                .tag_specifications(tag_spec(ResourceType::Volume, tags))
                .metadata_options(
                    InstanceMetadataOptionsRequest::builder()
                        .http_tokens(if inf.imdsv2 == Imdsv2::Required {
                            HttpTokensState::Required
                        } else {
                            HttpTokensState::Optional
                        })
                        .http_endpoint(aws_sdk_ec2::types::InstanceMetadataEndpointState::Enabled)
                        // One hop: a container on the instance cannot reach the credentials.
                        .http_put_response_hop_limit(1)
                        .build(),
                );
            if spec.terminate_on_shutdown {
                req = req.instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate);
            }
            let groups = if inf.security_group_ids.is_empty() {
                vec![
                    self.kiln_security_group(&spec.region, inf.subnet_id.as_deref())
                        .await?,
                ]
            } else {
                inf.security_group_ids.clone()
            };
            let mut nic = InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .set_associate_public_ip_address(inf.associate_public_ip)
                .set_groups(Some(groups));
            if let Some(subnet) = &inf.subnet_id {
                nic = nic.subnet_id(subnet);
            }
            req = req.network_interfaces(nic.build());
            // The pipeline's profile, or the stack's: a builder must reach SSM.
            let profile = inf
                .instance_profile
                .as_ref()
                .or(self.settings.instance_profile.as_ref());
            if let Some(profile) = profile {
                let p = if profile.starts_with("arn:") {
                    IamInstanceProfileSpecification::builder().arn(profile)
                } else {
                    IamInstanceProfileSpecification::builder().name(profile)
                };
                req = req.iam_instance_profile(p.build());
            }
            if let Some(key) = &inf.key_pair {
                req = req.key_name(key);
            }
            if let Some(ud) = &spec.user_data {
                req = req.user_data(base64::engine::general_purpose::STANDARD.encode(ud));
            }
            for d in &spec.block_devices {
                let mut ebs = EbsBlockDevice::builder()
                    .encrypted(d.encrypted)
                    .delete_on_termination(d.delete_on_termination);
                if let Some(size) = d.volume_size {
                    ebs = ebs.volume_size(size as i32);
                }
                if let Some(t) = d.volume_type {
                    ebs = ebs.volume_type(volume_type(t));
                }
                if let Some(i) = d.iops {
                    ebs = ebs.iops(i as i32);
                }
                if let Some(t) = d.throughput {
                    ebs = ebs.throughput(t as i32);
                }
                if let Some(k) = &d.kms_key_id {
                    ebs = ebs.kms_key_id(k);
                }
                req = req.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(&d.device_name)
                        .ebs(ebs.build())
                        .build(),
                );
            }
            let out = req.send().await.map_err(|e| sdk_error("RunInstances", e))?;
            out.instances()
                .first()
                .and_then(|i| i.instance_id())
                .map(|i| InstanceId(i.to_string()))
                .ok_or_else(|| {
                    StageError::new(ErrorKind::Internal, "RunInstances returned no instance")
                })
        })
    }

    fn instance_state<'a>(
        &'a self,
        region: &'a str,
        id: &'a InstanceId,
    ) -> PortResult<'a, InstanceState> {
        Box::pin(async move {
            let out = self
                .ec2(region)
                .describe_instances()
                .instance_ids(id.as_str())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeInstances", e))?;
            let state = out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find_map(|i| i.state().and_then(|s| s.name()).cloned());
            Ok(match state {
                Some(InstanceStateName::Pending) => InstanceState::Pending,
                Some(InstanceStateName::Running) => InstanceState::Running,
                Some(InstanceStateName::Stopping) => InstanceState::Stopping,
                Some(InstanceStateName::Stopped) => InstanceState::Stopped,
                Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
                    InstanceState::Terminated
                }
                // Right after launch an instance may not be visible yet.
                _ => {
                    return Err(StageError::new(
                        ErrorKind::Retryable,
                        format!("instance {id} is not visible yet"),
                    )
                    .with_code("InvalidInstanceID.NotFound"))
                }
            })
        })
    }

    fn stop<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.ec2(region)
                .stop_instances()
                .instance_ids(id.as_str())
                .send()
                .await
                .map_err(|e| sdk_error("StopInstances", e))?;
            Ok(())
        })
    }

    fn terminate<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        Box::pin(async move {
            match self
                .ec2(region)
                .terminate_instances()
                .instance_ids(id.as_str())
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
                Err(e) => Err(sdk_error("TerminateInstances", e)),
            }
        })
    }

    fn instances_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<InstanceId>> {
        Box::pin(async move {
            let live = Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build();
            let out = self
                .ec2(region)
                .describe_instances()
                .set_filters(self.in_stack(vec![build_filter(build), live]))
                .send()
                .await
                .map_err(|e| sdk_error("DescribeInstances", e))?;
            Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter_map(|i| i.instance_id())
                .map(|i| InstanceId(i.to_string()))
                .collect())
        })
    }

    fn create_image<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        name: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> PortResult<'a, ImageId> {
        Box::pin(async move {
            let client = self.ec2(region);
            let description = format!(
                "kiln build {}",
                tags.get("kiln:version").cloned().unwrap_or_default()
            );
            let tags = &self.stack_tags(tags);
            let request = client
                .create_image()
                .instance_id(instance.as_str())
                .name(name)
                .description(&description)
                .tag_specifications(tag_spec(ResourceType::Image, tags))
                .tag_specifications(tag_spec(ResourceType::Snapshot, tags));
            // Image and snapshots tagged in the same call: the stack's policy allows CreateTags
            // only with `ec2:CreateAction` CreateImage.
            let out = request
                .send()
                .await
                .map_err(|e| sdk_error("CreateImage", e))?;
            out.image_id()
                .map(|i| ImageId(i.to_string()))
                .ok_or_else(|| {
                    StageError::new(ErrorKind::Internal, "CreateImage returned no image id")
                })
        })
    }

    fn describe_image<'a>(
        &'a self,
        region: &'a str,
        id: &'a ImageId,
    ) -> PortResult<'a, Option<ImageFacts>> {
        Box::pin(async move {
            Ok(self.describe_one(region, id).await?.map(|i| ImageFacts {
                state: state_of(&i, id),
                architecture: i
                    .architecture()
                    .map(|a| a.as_str().to_string())
                    .unwrap_or_default(),
                root_device: i.root_device_name().map(str::to_string),
            }))
        })
    }

    fn instance_architectures<'a>(
        &'a self,
        region: &'a str,
        types: &'a [String],
    ) -> PortResult<'a, BTreeMap<String, Vec<String>>> {
        Box::pin(async move {
            let mut req = self.ec2(region).describe_instance_types();
            for t in types {
                req = req.instance_types(InstanceType::from(t.as_str()));
            }
            let out = match req.send().await {
                Ok(o) => o,
                // An unknown type among them: say nothing (RunInstances names it).
                Err(e) if e.code() == Some("InvalidInstanceType") => return Ok(BTreeMap::new()),
                Err(e) => return Err(sdk_error("DescribeInstanceTypes", e)),
            };
            Ok(out
                .instance_types()
                .iter()
                .filter_map(|t| {
                    let name = t.instance_type()?.as_str().to_string();
                    let arches = t
                        .processor_info()?
                        .supported_architectures()
                        .iter()
                        .map(|a| a.as_str().to_string())
                        .collect();
                    Some((name, arches))
                })
                .collect())
        })
    }

    fn image_state<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState> {
        Box::pin(async move {
            // Not found yet: a new image's id may precede its DescribeImages entry.
            Ok(match self.describe_one(region, id).await? {
                Some(i) => state_of(&i, id),
                None => ImageState::Pending,
            })
        })
    }

    fn images_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<ImageId>> {
        Box::pin(async move {
            let out = self
                .ec2(region)
                .describe_images()
                .owners("self")
                .set_filters(self.in_stack(vec![build_filter(build)]))
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            Ok(out
                .images()
                .iter()
                .filter_map(|i| i.image_id())
                .map(|i| ImageId(i.to_string()))
                .collect())
        })
    }

    fn copy_image<'a>(
        &'a self,
        from_region: &'a str,
        image: &'a ImageId,
        to_region: &'a str,
        copy: CopySpec<'a>,
    ) -> PortResult<'a, ImageId> {
        let CopySpec {
            name,
            client_token,
            tags,
            kms_key_id,
        } = copy;
        Box::pin(async move {
            let client = self.ec2(to_region);
            // The copy and its snapshots are tagged in the same call, so that clean-up and
            // lifecycle find them by build, and the stack's policy allows CreateTags only with
            // `ec2:CreateAction` CopyImage.
            let tags = &self.stack_tags(tags);
            let mut req = client
                .copy_image()
                .source_region(from_region)
                .source_image_id(image.as_str())
                .name(name)
                .client_token(client_token)
                .tag_specifications(tag_spec(ResourceType::Image, tags))
                .tag_specifications(tag_spec(ResourceType::Snapshot, tags));
            // The region's own key: a KMS key is regional, so each copy names its region's.
            if let Some(key) = kms_key_id {
                req = req.encrypted(true).kms_key_id(key);
            }
            let out = req.send().await.map_err(|e| sdk_error("CopyImage", e))?;
            let id = out
                .image_id()
                .map(|i| ImageId(i.to_string()))
                .ok_or_else(|| {
                    StageError::new(ErrorKind::Internal, "CopyImage returned no image id")
                })?;
            Ok(id)
        })
    }

    fn share_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        permission: &'a LaunchPermission,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            let mut adds = Vec::new();
            adds.extend(
                permission
                    .accounts
                    .iter()
                    .map(|a| Ec2LaunchPermission::builder().user_id(a).build()),
            );
            adds.extend(
                permission
                    .organization_arns
                    .iter()
                    .map(|a| Ec2LaunchPermission::builder().organization_arn(a).build()),
            );
            adds.extend(permission.organizational_unit_arns.iter().map(|a| {
                Ec2LaunchPermission::builder()
                    .organizational_unit_arn(a)
                    .build()
            }));
            if permission.public {
                adds.push(
                    Ec2LaunchPermission::builder()
                        .group(aws_sdk_ec2::types::PermissionGroup::All)
                        .build(),
                );
            }
            if adds.is_empty() {
                return Ok(());
            }
            self.ec2(region)
                .modify_image_attribute()
                .image_id(image.as_str())
                .launch_permission(
                    LaunchPermissionModifications::builder()
                        .set_add(Some(adds))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk_error("ModifyImageAttribute", e))?;
            // The accounts may also read the snapshots, so that they can copy the image (and
            // re-encrypt it with a key of their own); snapshots cannot be shared with an
            // organization or an OU, nor made public by kiln.
            if !permission.accounts.is_empty() {
                let client = self.ec2(region);
                let snapshots = self.snapshots_of(region, image).await?.unwrap_or_default();
                for snapshot in snapshots {
                    client
                        .modify_snapshot_attribute()
                        .snapshot_id(snapshot)
                        .attribute(
                            aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission,
                        )
                        .operation_type(aws_sdk_ec2::types::OperationType::Add)
                        .set_user_ids(Some(permission.accounts.clone()))
                        .send()
                        .await
                        .map_err(|e| sdk_error("ModifySnapshotAttribute", e))?;
                }
            }
            Ok(())
        })
    }

    fn delete_image<'a>(&'a self, region: &'a str, image: &'a ImageId) -> PortResult<'a, ()> {
        Box::pin(async move {
            let client = self.ec2(region);
            let Some(snapshots) = self.snapshots_of(region, image).await? else {
                return Ok(());
            };
            match client
                .deregister_image()
                .image_id(image.as_str())
                .send()
                .await
            {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.code(),
                        Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
                    ) => {}
                Err(e) => return Err(sdk_error("DeregisterImage", e)),
            }
            for s in snapshots {
                match client.delete_snapshot().snapshot_id(&s).send().await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {}
                    Err(e) => return Err(sdk_error("DeleteSnapshot", e)),
                }
            }
            Ok(())
        })
    }

    fn latest_image<'a>(
        &'a self,
        region: &'a str,
        filter: &'a ParentFilter,
    ) -> PortResult<'a, Option<ImageId>> {
        Box::pin(async move {
            let mut req = self
                .ec2(region)
                .describe_images()
                .set_owners(Some(filter.owners.clone()))
                .filters(Filter::builder().name("name").values(&filter.name).build())
                .filters(Filter::builder().name("state").values("available").build());
            if let Some(a) = filter.architecture {
                req = req.filters(
                    Filter::builder()
                        .name("architecture")
                        .values(a.as_str())
                        .build(),
                );
            }
            let out = req
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            Ok(out
                .images()
                .iter()
                .max_by_key(|i| i.creation_date().unwrap_or_default().to_string())
                .and_then(|i| i.image_id())
                .map(|i| ImageId(i.to_string())))
        })
    }

    fn image_named<'a>(
        &'a self,
        region: &'a str,
        name: &'a str,
    ) -> PortResult<'a, Option<ImageId>> {
        Box::pin(async move {
            let out = self
                .ec2(region)
                .describe_images()
                .owners("self")
                .filters(Filter::builder().name("name").values(name).build())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            Ok(out
                .images()
                .first()
                .and_then(|i| i.image_id())
                .map(|i| ImageId(i.to_string())))
        })
    }

    fn new_launch_template_version<'a>(
        &'a self,
        region: &'a str,
        template: &'a str,
        image: &'a ImageId,
        set_default: bool,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            let client = self.ec2(region);
            let out = client
                .create_launch_template_version()
                .launch_template_id(template)
                .source_version("$Latest")
                .launch_template_data(
                    RequestLaunchTemplateData::builder()
                        .image_id(image.as_str())
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk_error("CreateLaunchTemplateVersion", e))?;
            if set_default {
                let version = out
                    .launch_template_version()
                    .and_then(|v| v.version_number())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "$Latest".into());
                client
                    .modify_launch_template()
                    .launch_template_id(template)
                    .default_version(version)
                    .send()
                    .await
                    .map_err(|e| sdk_error("ModifyLaunchTemplate", e))?;
            }
            Ok(())
        })
    }

    fn pipeline_images<'a>(
        &'a self,
        region: &'a str,
        pipeline: &'a str,
    ) -> PortResult<'a, Vec<crate::ports::ImageInfo>> {
        Box::pin(async move {
            let out = self
                .ec2(region)
                .describe_images()
                .owners("self")
                .set_filters(self.in_stack(vec![
                    Filter::builder()
                        .name("tag:kiln:pipeline")
                        .values(pipeline)
                        .build(),
                    Filter::builder().name("state").values("available").build(),
                ]))
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            let time = |t: Option<&str>| {
                t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
            };
            Ok(out
                .images()
                .iter()
                .filter_map(|i| {
                    Some(crate::ports::ImageInfo {
                        id: ImageId(i.image_id()?.to_string()),
                        name: i.name().unwrap_or_default().to_string(),
                        created: time(i.creation_date())?,
                        tags: i
                            .tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                            .collect(),
                        deprecated: time(i.deprecation_time()),
                    })
                })
                .collect())
        })
    }

    fn deprecate_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.ec2(region)
                .enable_image_deprecation()
                .image_id(image.as_str())
                .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(at.timestamp()))
                .send()
                .await
                .map_err(|e| sdk_error("EnableImageDeprecation", e))?;
            Ok(())
        })
    }
}
