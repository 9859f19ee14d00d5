//! An in-memory cloud implementing every port, with faults to inject. It shows what moto cannot
//! (ClientToken idempotency, pending images, commands that fail or stay in progress, capacity
//! errors, throttling) and lets the stage tests run in microseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use kiln::errors::{ErrorKind, StageError};
use kiln::model::build::{Build, BuildId, BuildStatus, CommandId, ImageId, InstanceId};
use kiln::model::pipeline::{LaunchPermission, ParentFilter};
use kiln::ports::*;

#[derive(Debug, Clone)]
pub struct Instance {
    pub region: String,
    pub image: ImageId,
    pub instance_type: String,
    pub state: InstanceState,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub region: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub state: ImageState,
    /// `image_state` answers Pending this many more times.
    pub pending_checks: u32,
    pub shared_with: Vec<LaunchPermission>,
    pub snapshots: Vec<String>,
    pub created: DateTime<Utc>,
    pub deprecated: Option<DateTime<Utc>>,
    /// The owning account: `ACCOUNT` for the images a build makes, `AMAZON` for parents.
    pub owner: String,
    /// `x86_64` or `arm64`.
    pub architecture: String,
}

/// The account the in-memory cloud's caller is in (EC2's `self`).
pub const ACCOUNT: &str = "123456789012";
/// Amazon's account (owner alias `amazon`), which publishes the Amazon Linux images.
pub const AMAZON: &str = "137112412989";

/// An EBS snapshot, which outlives its image unless deleted (as in EC2).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub region: String,
    pub image: ImageId,
}

#[derive(Debug, Clone)]
pub struct Command {
    pub instance: InstanceId,
    pub plan: CommandPlan,
    pub in_progress_checks: u32,
    pub outcome: CommandStatus,
}

/// Faults to inject.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Instance types without capacity.
    pub no_capacity: BTreeSet<String>,
    /// How many times each image stays pending.
    pub image_pending_checks: u32,
    /// How many status checks each command stays in progress.
    pub command_in_progress_checks: u32,
    /// The outcome of commands that run the given phase ("build", "test").
    pub command_fails: BTreeMap<String, CommandStatus>,
    /// Copies to these regions fail.
    pub copy_fails: BTreeSet<String>,
    /// Created images (home region) fail.
    pub image_fails: bool,
    /// The next N compute calls are throttled.
    pub throttle_next: u32,
    /// Every TerminateInstances fails as a transient EC2 error (InternalError).
    pub terminate_fails: bool,
}

#[derive(Debug, Default)]
pub struct Cloud {
    pub instances: BTreeMap<InstanceId, Instance>,
    pub images: BTreeMap<ImageId, Image>,
    /// Every snapshot, by id: an image's go with it only when kiln deletes them.
    pub snapshots: BTreeMap<String, Snapshot>,
    pub tokens: BTreeMap<String, String>,
    pub commands: BTreeMap<CommandId, Command>,
    pub parameters: BTreeMap<(String, String), String>,
    pub pipelines: BTreeMap<String, PipelineRecord>,
    pub builds: BTreeMap<BuildId, Build>,
    pub locks: BTreeMap<String, (BuildId, DateTime<Utc>)>,
    pub events: Vec<BuildEvent>,
    pub launch_templates: Vec<(String, String, ImageId, bool)>,
    /// Pipelines whose schedule runs, and why a disabled one was disabled.
    pub schedules: BTreeMap<String, Option<String>>,
    pub launches: u32,
    /// Copies made (CopyImage calls that made an image).
    pub copies: u32,
    /// Every launch permission granted, in order (kept after the image is deleted).
    pub shares: Vec<(ImageId, LaunchPermission)>,
    pub faults: Faults,
    next: u64,
}

/// The in-memory cloud.
#[derive(Debug, Default)]
pub struct MemoryCloud {
    pub cloud: Mutex<Cloud>,
    pub now: Mutex<Option<DateTime<Utc>>>,
    /// A real store in place of the in-memory one (SQLite, in its own folder), for tests whose
    /// subject is the stages rather than the store's faults.
    real_store: Option<(kiln::local::SqliteStore, tempfile::TempDir)>,
    /// The task tokens waiting for a state change (see `kiln::stages::wake`).
    pub wakeups: kiln::stages::wake::KeptTokens,
}

fn ok<'a, T: Send + 'a>(v: Result<T, StageError>) -> PortResult<'a, T> {
    Box::pin(async move { v })
}

impl Cloud {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{:017x}", self.next)
    }

    /// Registers a new image (with one snapshot) and returns its id.
    fn new_image(
        &mut self,
        region: &str,
        name: &str,
        tags: &BTreeMap<String, String>,
        state: ImageState,
        pending_checks: u32,
        created: DateTime<Utc>,
    ) -> ImageId {
        let id = ImageId(self.id("ami"));
        let snapshots = vec![self.id("snap")];
        for snap in &snapshots {
            self.snapshots.insert(
                snap.clone(),
                Snapshot {
                    region: region.into(),
                    image: id.clone(),
                },
            );
        }
        self.images.insert(
            id.clone(),
            Image {
                region: region.into(),
                name: name.into(),
                tags: tags.clone(),
                state,
                pending_checks,
                shared_with: Vec::new(),
                snapshots,
                created,
                deprecated: None,
                owner: ACCOUNT.into(),
                architecture: "x86_64".into(),
            },
        );
        id
    }

    fn throttled(&mut self) -> Result<(), StageError> {
        if self.faults.throttle_next > 0 {
            self.faults.throttle_next -= 1;
            return Err(
                StageError::new(ErrorKind::Retryable, "request limit exceeded")
                    .with_code("RequestLimitExceeded"),
            );
        }
        Ok(())
    }
}

impl MemoryCloud {
    pub fn new() -> Self {
        MemoryCloud::default()
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Cloud) -> T) -> T {
        f(&mut self
            .cloud
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Registers an available image of Amazon's, e.g. a parent.
    pub fn add_image(&self, region: &str, name: &str) -> ImageId {
        let now = Clock::now(self);
        self.add_image_as(region, name, AMAZON, "x86_64", now)
    }

    /// Registers an available image of `owner`'s, for `architecture`, created at `created`.
    pub fn add_image_as(
        &self,
        region: &str,
        name: &str,
        owner: &str,
        architecture: &str,
        created: DateTime<Utc>,
    ) -> ImageId {
        self.with(|c| {
            let id = c.new_image(
                region,
                name,
                &BTreeMap::new(),
                ImageState::Available,
                0,
                created,
            );
            let image = c.images.get_mut(&id).expect("just made");
            image.owner = owner.into();
            image.architecture = architecture.into();
            id
        })
    }

    /// The in-memory cloud over a real store: SQLite, as the embedded mode keeps it.
    pub fn on_sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a folder for the store");
        let store = kiln::local::SqliteStore::open(&dir.path().join("state.db")).expect("SQLite");
        MemoryCloud {
            real_store: Some((store, dir)),
            ..MemoryCloud::default()
        }
    }

    /// The store the ports use.
    pub fn store(&self) -> &dyn Store {
        match &self.real_store {
            Some((s, _)) => s,
            None => self,
        }
    }

    /// The triggers the ports use: SQLite's schedules when the store is SQLite.
    pub fn triggers(&self) -> &dyn Triggers {
        match &self.real_store {
            Some((s, _)) => s,
            None => self,
        }
    }

    /// Gives `pipeline` an enabled weekly schedule (in SQLite when the store is SQLite).
    pub fn add_schedule(&self, pipeline: &str) {
        match &self.real_store {
            Some((s, _)) => s
                .put_schedule(&kiln::local::ScheduleRow {
                    pipeline: pipeline.into(),
                    cron: "cron(0 3 ? * MON *)".into(),
                    timezone: "UTC".into(),
                    enabled: true,
                    disabled_reason: None,
                    next_run: None,
                })
                .expect("schedule"),
            None => {
                self.with(|c| c.schedules.insert(pipeline.into(), None));
            }
        }
    }

    /// Why `pipeline`'s schedule is disabled, if it is: read back from where it is kept, SQLite's
    /// rows read raw by `sqlite3` rather than through kiln's store.
    pub fn schedule_disabled(&self, pipeline: &str) -> Option<String> {
        match &self.real_store {
            Some((_, dir)) => {
                let quoted = pipeline.replace('\'', "''");
                let out = std::process::Command::new("sqlite3")
                    .arg(dir.path().join("state.db"))
                    .arg(format!(
                        "SELECT enabled, coalesce(disabled_reason, '') FROM schedules WHERE pipeline = '{quoted}'"
                    ))
                    .output()
                    .expect("sqlite3 (installed by make setup)");
                assert!(
                    out.status.success(),
                    "sqlite3: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let row = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
                let (enabled, reason) = row.split_once('|')?;
                (enabled == "0").then(|| reason.to_string())
            }
            None => self.with(|c| c.schedules.get(pipeline).cloned().flatten()),
        }
    }

    /// Whether another build could take `pipeline`'s lock now (asked through the store).
    pub fn lock_free(&self, pipeline: &str) -> bool {
        let probe = BuildId("lock-probe".into());
        let store = self.store();
        let free =
            futures::executor::block_on(store.lock(pipeline, &probe, Clock::now(self), 1)).is_ok();
        if free {
            let _ = futures::executor::block_on(store.unlock(pipeline, &probe));
        }
        free
    }

    pub fn ports(&self) -> Ports<'_> {
        Ports {
            compute: self,
            commands: self,
            store: self.store(),
            events: self,
            parameters: self,
            triggers: self.triggers(),
            wakeups: &self.wakeups,
            clock: self,
        }
    }

    /// Instances not terminated.
    pub fn live_instances(&self) -> Vec<InstanceId> {
        self.with(|c| {
            c.instances
                .iter()
                .filter(|(_, i)| i.state != InstanceState::Terminated)
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    /// Images carrying a build id tag.
    pub fn build_images(&self) -> Vec<(String, ImageId)> {
        self.with(|c| {
            c.images
                .iter()
                .filter(|(_, i)| i.tags.contains_key("kiln:build-id"))
                .map(|(id, i)| (i.region.clone(), id.clone()))
                .collect()
        })
    }
}

impl Triggers for MemoryCloud {
    fn disable<'a>(&'a self, pipeline: &'a str, reason: &'a str) -> PortResult<'a, bool> {
        ok(Ok(self.with(|c| match c.schedules.get_mut(pipeline) {
            Some(state @ None) => {
                *state = Some(reason.to_string());
                true
            }
            _ => false,
        })))
    }
}

impl Clock for MemoryCloud {
    fn now(&self) -> DateTime<Utc> {
        self.now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(Utc::now)
    }
}

impl Compute for MemoryCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId> {
        ok(self.with(|c| {
            c.throttled()?;
            if let Some(existing) = c.tokens.get(&spec.client_token) {
                return Ok(InstanceId(existing.clone()));
            }
            if c.faults.no_capacity.contains(&spec.instance_type) {
                return Err(StageError::new(
                    ErrorKind::Capacity,
                    format!("no capacity for {}", spec.instance_type),
                )
                .with_code("InsufficientInstanceCapacity"));
            }
            if !c
                .images
                .get(&spec.image)
                .is_some_and(|i| i.state == ImageState::Available)
            {
                return Err(StageError::new(
                    ErrorKind::InvalidPipeline,
                    format!("image {} is not available", spec.image),
                )
                .with_code("InvalidAMIID.NotFound"));
            }
            let id = InstanceId(c.id("i"));
            c.tokens.insert(spec.client_token.clone(), id.0.clone());
            c.launches += 1;
            c.instances.insert(
                id.clone(),
                Instance {
                    region: spec.region.clone(),
                    image: spec.image.clone(),
                    instance_type: spec.instance_type.clone(),
                    state: InstanceState::Running,
                    tags: spec.tags.clone(),
                },
            );
            Ok(id)
        }))
    }

    fn instance_state<'a>(
        &'a self,
        _region: &'a str,
        id: &'a InstanceId,
    ) -> PortResult<'a, InstanceState> {
        ok(self.with(|c| {
            c.instances.get(id).map(|i| i.state).ok_or_else(|| {
                StageError::new(ErrorKind::Retryable, format!("no instance {id}"))
                    .with_code("InvalidInstanceID.NotFound")
            })
        }))
    }

    fn stop<'a>(&'a self, _region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            match c.instances.get_mut(id) {
                Some(i) if i.state != InstanceState::Terminated => i.state = InstanceState::Stopped,
                Some(_) => {
                    return Err(
                        StageError::new(ErrorKind::Internal, format!("{id} is terminated"))
                            .with_code("IncorrectInstanceState"),
                    )
                }
                None => {
                    return Err(
                        StageError::new(ErrorKind::Retryable, format!("no instance {id}"))
                            .with_code("InvalidInstanceID.NotFound"),
                    )
                }
            }
            Ok(())
        }))
    }

    fn terminate<'a>(&'a self, _region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            if c.faults.terminate_fails {
                return Err(StageError::new(
                    ErrorKind::Retryable,
                    "TerminateInstances: we encountered an internal error",
                )
                .with_code("InternalError"));
            }
            if let Some(i) = c.instances.get_mut(id) {
                i.state = InstanceState::Terminated;
            }
            Ok(())
        }))
    }

    fn instances_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<InstanceId>> {
        ok(Ok(self.with(|c| {
            c.instances
                .iter()
                .filter(|(_, i)| {
                    i.region == region
                        && i.state != InstanceState::Terminated
                        && i.tags.get("kiln:build-id") == Some(&build.0)
                })
                .map(|(id, _)| id.clone())
                .collect()
        })))
    }

    fn create_image<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        name: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> PortResult<'a, ImageId> {
        let now = Clock::now(self);
        ok(self.with(|c| {
            c.throttled()?;
            if !c
                .instances
                .get(instance)
                .is_some_and(|i| i.state == InstanceState::Stopped)
            {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!("{instance} is not stopped"),
                )
                .with_code("IncorrectInstanceState"));
            }
            if c.images
                .values()
                .any(|i| i.region == region && i.name == name)
            {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!("an image named {name} exists"),
                )
                .with_code("InvalidAMIName.Duplicate"));
            }
            let state = if c.faults.image_fails {
                ImageState::Failed("snapshot failed".into())
            } else {
                ImageState::Available
            };
            let pending = c.faults.image_pending_checks;
            Ok(c.new_image(region, name, tags, state, pending, now))
        }))
    }

    fn describe_image<'a>(
        &'a self,
        region: &'a str,
        id: &'a ImageId,
    ) -> PortResult<'a, Option<ImageFacts>> {
        ok(Ok(self.with(|c| {
            c.images
                .get(id)
                .filter(|i| i.region == region)
                .map(|i| ImageFacts {
                    state: if i.pending_checks > 0 {
                        ImageState::Pending
                    } else {
                        i.state.clone()
                    },
                    architecture: i.architecture.clone(),
                    root_device: Some("/dev/xvda".into()),
                })
        })))
    }

    /// A port-level stand-in for DescribeInstanceTypes: Graviton families (a `g` after the
    /// generation, as in t4g, m7g, c6gd) are arm64, every other type x86_64.
    fn instance_architectures<'a>(
        &'a self,
        _region: &'a str,
        types: &'a [String],
    ) -> PortResult<'a, BTreeMap<String, Vec<String>>> {
        let arch = |t: &str| {
            let family = t.split('.').next().unwrap_or_default();
            let after = family.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            let graviton = after
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .starts_with('g');
            if graviton {
                "arm64"
            } else {
                "x86_64"
            }
        };
        ok(Ok(types
            .iter()
            .map(|t| (t.clone(), vec![arch(t).to_string()]))
            .collect()))
    }

    fn image_state<'a>(&'a self, _region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState> {
        ok(self.with(|c| match c.images.get_mut(id) {
            Some(i) if i.pending_checks > 0 => {
                i.pending_checks -= 1;
                Ok(ImageState::Pending)
            }
            Some(i) => Ok(i.state.clone()),
            None => Err(
                StageError::new(ErrorKind::Retryable, format!("no image {id}"))
                    .with_code("InvalidAMIID.NotFound"),
            ),
        }))
    }

    fn images_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<ImageId>> {
        ok(Ok(self.with(|c| {
            c.images
                .iter()
                .filter(|(_, i)| {
                    i.region == region && i.tags.get("kiln:build-id") == Some(&build.0)
                })
                .map(|(id, _)| id.clone())
                .collect()
        })))
    }

    fn copy_image<'a>(
        &'a self,
        _from: &'a str,
        image: &'a ImageId,
        to: &'a str,
        copy: CopySpec<'a>,
    ) -> PortResult<'a, ImageId> {
        let CopySpec {
            name,
            client_token: token,
            tags,
            ..
        } = copy;
        let now = Clock::now(self);
        ok(self.with(|c| {
            if let Some(existing) = c.tokens.get(token) {
                return Ok(ImageId(existing.clone()));
            }
            if !c.images.contains_key(image) {
                return Err(
                    StageError::new(ErrorKind::Internal, format!("no image {image}"))
                        .with_code("InvalidAMIID.NotFound"),
                );
            }
            let state = if c.faults.copy_fails.contains(to) {
                ImageState::Failed("copy failed".into())
            } else {
                ImageState::Available
            };
            let pending = c.faults.image_pending_checks;
            let architecture = c.images[image].architecture.clone();
            let id = c.new_image(to, name, tags, state, pending, now);
            if let Some(copy) = c.images.get_mut(&id) {
                copy.architecture = architecture;
            }
            c.tokens.insert(token.into(), id.0.clone());
            c.copies += 1;
            Ok(id)
        }))
    }

    fn share_image<'a>(
        &'a self,
        _region: &'a str,
        image: &'a ImageId,
        permission: &'a LaunchPermission,
    ) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            let i = c
                .images
                .get_mut(image)
                .ok_or_else(|| StageError::new(ErrorKind::Internal, format!("no image {image}")))?;
            if !i.shared_with.contains(permission) {
                i.shared_with.push(permission.clone());
            }
            c.shares.push((image.clone(), permission.clone()));
            Ok(())
        }))
    }

    /// As the AWS adapter does it: DeregisterImage, then DeleteSnapshot for each of its
    /// snapshots (EC2 keeps them otherwise).
    fn delete_image<'a>(&'a self, _region: &'a str, image: &'a ImageId) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            if let Some(i) = c.images.remove(image) {
                for snap in i.snapshots {
                    c.snapshots.remove(&snap);
                }
            }
            Ok(())
        }))
    }

    /// As DescribeImages with owners, `name`, `state=available` and `architecture` filters
    /// answers, the newest by creation date.
    fn latest_image<'a>(
        &'a self,
        region: &'a str,
        filter: &'a ParentFilter,
    ) -> PortResult<'a, Option<ImageId>> {
        let owned = |owner: &str| {
            filter.owners.iter().any(|o| match o.as_str() {
                "self" => owner == ACCOUNT,
                "amazon" => owner == AMAZON,
                id => owner == id,
            })
        };
        let architecture = filter.architecture.map(|a| a.as_str());
        ok(Ok(self.with(|c| {
            c.images
                .iter()
                .filter(|(_, i)| {
                    i.region == region
                        && i.state == ImageState::Available
                        && kiln::model::pipeline::glob_match(&filter.name, &i.name)
                        && owned(&i.owner)
                        && architecture.is_none_or(|a| a == i.architecture)
                })
                .max_by_key(|(_, i)| i.created)
                .map(|(id, _)| id.clone())
        })))
    }

    fn image_named<'a>(
        &'a self,
        region: &'a str,
        name: &'a str,
    ) -> PortResult<'a, Option<ImageId>> {
        ok(Ok(self.with(|c| {
            c.images
                .iter()
                .find(|(_, i)| i.region == region && i.name == name)
                .map(|(id, _)| id.clone())
        })))
    }

    fn new_launch_template_version<'a>(
        &'a self,
        region: &'a str,
        template: &'a str,
        image: &'a ImageId,
        set_default: bool,
    ) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            let entry = (
                region.to_string(),
                template.to_string(),
                image.clone(),
                set_default,
            );
            if !c.launch_templates.contains(&entry) {
                c.launch_templates.push(entry);
            }
            Ok(())
        }))
    }

    fn pipeline_images<'a>(
        &'a self,
        region: &'a str,
        pipeline: &'a str,
    ) -> PortResult<'a, Vec<ImageInfo>> {
        ok(Ok(self.with(|c| {
            c.images
                .iter()
                .filter(|(_, i)| {
                    i.region == region
                        && i.state == ImageState::Available
                        && i.tags.get("kiln:pipeline").map(String::as_str) == Some(pipeline)
                })
                .map(|(id, i)| ImageInfo {
                    id: id.clone(),
                    name: i.name.clone(),
                    created: i.created,
                    tags: i.tags.clone(),
                    deprecated: i.deprecated,
                })
                .collect()
        })))
    }

    fn deprecate_image<'a>(
        &'a self,
        _region: &'a str,
        image: &'a ImageId,
        at: DateTime<Utc>,
    ) -> PortResult<'a, ()> {
        ok(self.with(|c| match c.images.get_mut(image) {
            Some(i) => {
                i.deprecated = Some(at);
                Ok(())
            }
            None => Err(
                StageError::new(ErrorKind::Retryable, format!("no image {image}"))
                    .with_code("InvalidAMIID.NotFound"),
            ),
        }))
    }
}

impl Commands for MemoryCloud {
    fn agent_online<'a>(
        &'a self,
        _region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool> {
        ok(Ok(self.with(|c| {
            c.instances
                .get(instance)
                .is_some_and(|i| i.state == InstanceState::Running)
        })))
    }

    fn send<'a>(
        &'a self,
        _region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId> {
        ok(self.with(|c| {
            let id = CommandId(c.id("cmd"));
            let phase = plan
                .phases
                .first()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let outcome = c
                .faults
                .command_fails
                .get(&phase)
                .cloned()
                .unwrap_or(CommandStatus::Success);
            c.commands.insert(
                id.clone(),
                Command {
                    instance: instance.clone(),
                    plan: plan.clone(),
                    in_progress_checks: c.faults.command_in_progress_checks,
                    outcome,
                },
            );
            Ok(id)
        }))
    }

    fn status<'a>(
        &'a self,
        _region: &'a str,
        _instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus> {
        ok(self.with(|c| match c.commands.get_mut(command) {
            Some(cmd) if cmd.in_progress_checks > 0 => {
                cmd.in_progress_checks -= 1;
                Ok(CommandStatus::InProgress)
            }
            Some(cmd) => Ok(cmd.outcome.clone()),
            None => Err(
                StageError::new(ErrorKind::Retryable, format!("no command {command}"))
                    .with_code("InvocationDoesNotExist"),
            ),
        }))
    }
}

impl Store for MemoryCloud {
    fn put_pipeline<'a>(&'a self, record: &'a PipelineRecord) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            let p = &record.pipeline;
            if let Some(existing) = c.pipelines.get(&p.name) {
                if existing.pipeline.version == p.version && existing != record {
                    return Err(StageError::new(
                        ErrorKind::InvalidPipeline,
                        format!(
                            "pipeline {} version {} exists with other content; raise `version`",
                            p.name, p.version
                        ),
                    ));
                }
            }
            c.pipelines.insert(p.name.clone(), record.clone());
            Ok(())
        }))
    }

    fn pipeline_names(&self) -> PortResult<'_, Vec<String>> {
        ok(Ok(self.with(|c| c.pipelines.keys().cloned().collect())))
    }

    fn pipeline<'a>(&'a self, name: &'a str) -> PortResult<'a, Option<PipelineRecord>> {
        ok(Ok(self.with(|c| c.pipelines.get(name).cloned())))
    }

    fn create_build<'a>(&'a self, build: &'a Build) -> PortResult<'a, ()> {
        ok(self.with(|c| match c.builds.get(&build.id) {
            Some(existing) if existing != build => Err(StageError::new(
                ErrorKind::Internal,
                format!("build {} exists with other content", build.id),
            )),
            _ => {
                c.builds.insert(build.id.clone(), build.clone());
                Ok(())
            }
        }))
    }

    fn save_build<'a>(&'a self, build: &'a Build, expected: BuildStatus) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            let stored = c.builds.get(&build.id).map(|b| b.status).ok_or_else(|| {
                StageError::new(ErrorKind::Internal, format!("no build {}", build.id))
            })?;
            if stored != expected && stored != build.status {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!(
                        "build {} is {}, not {} (a stale update)",
                        build.id,
                        stored.as_str(),
                        expected.as_str()
                    ),
                )
                .with_code("ConditionalCheckFailedException"));
            }
            if !stored.can_become(build.status) {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!(
                        "build {} cannot move from {} to {}",
                        build.id,
                        stored.as_str(),
                        build.status.as_str()
                    ),
                )
                .with_code("ConditionalCheckFailedException"));
            }
            c.builds.insert(build.id.clone(), build.clone());
            Ok(())
        }))
    }

    fn build<'a>(&'a self, pipeline: &'a str, id: &'a BuildId) -> PortResult<'a, Option<Build>> {
        ok(Ok(self.with(|c| {
            c.builds.get(id).filter(|b| b.pipeline == pipeline).cloned()
        })))
    }

    fn builds<'a>(&'a self, pipeline: &'a str) -> PortResult<'a, Vec<Build>> {
        ok(Ok(self.with(|c| {
            c.builds
                .values()
                .filter(|b| b.pipeline == pipeline)
                .cloned()
                .collect()
        })))
    }

    fn lock<'a>(
        &'a self,
        pipeline: &'a str,
        build: &'a BuildId,
        now: DateTime<Utc>,
        ttl: i64,
    ) -> PortResult<'a, ()> {
        ok(self.with(|c| match c.locks.get(pipeline) {
            Some((holder, expires)) if holder != build && *expires > now => Err(StageError::new(
                ErrorKind::Locked,
                format!("pipeline {pipeline} is being built by build {holder}"),
            )),
            _ => {
                c.locks.insert(
                    pipeline.into(),
                    (build.clone(), now + chrono::Duration::seconds(ttl)),
                );
                Ok(())
            }
        }))
    }

    fn unlock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            if c.locks
                .get(pipeline)
                .is_some_and(|(holder, _)| holder == build)
            {
                c.locks.remove(pipeline);
            }
            Ok(())
        }))
    }
}

impl Events for MemoryCloud {
    fn emit<'a>(&'a self, event: &'a BuildEvent) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            c.events.push(event.clone());
            Ok(())
        }))
    }
}

impl Parameters for MemoryCloud {
    fn get<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<String>> {
        ok(Ok(self.with(|c| {
            c.parameters
                .get(&(region.to_string(), name.to_string()))
                .cloned()
        })))
    }

    fn put<'a>(&'a self, region: &'a str, name: &'a str, value: &'a str) -> PortResult<'a, ()> {
        ok(self.with(|c| {
            c.parameters
                .insert((region.into(), name.into()), value.into());
            Ok(())
        }))
    }
}

impl PortsProvider for MemoryCloud {
    fn ports(&self) -> Ports<'_> {
        MemoryCloud::ports(self)
    }
}
