//! The capabilities the stages need, sized to the stages rather than to any SDK. Each has an
//! AWS implementation and an embedded one; stage code never names a backend. Futures are boxed
//! so the ports can be used as trait objects.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::component::PhaseName;
use crate::errors::StageError;
use crate::model::build::{Awaited, Build, BuildId, BuildStatus, CommandId, ImageId, InstanceId};
use crate::model::pipeline::{
    BlockDevice, Infrastructure, LaunchPermission, ParentFilter, Pipeline,
};

pub type PortResult<'a, T> = BoxFuture<'a, Result<T, StageError>>;

/// A component as the stages carry it: the validated document (typed JSON) and its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComponentSpec {
    pub name: String,
    pub document: serde_json::Value,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// What the store keeps of one pipeline version: the definition and its component documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRecord {
    pub pipeline: Pipeline,
    pub components: Vec<ComponentSpec>,
    pub tests: Vec<ComponentSpec>,
}

impl From<&crate::model::LoadedPipeline> for PipelineRecord {
    fn from(l: &crate::model::LoadedPipeline) -> Self {
        let spec = |c: &crate::model::LoadedComponent| ComponentSpec {
            name: c.display_name(),
            document: c.document.json.clone(),
            parameters: c.parameters.clone(),
        };
        PipelineRecord {
            pipeline: l.pipeline.clone(),
            components: l.components.iter().map(spec).collect(),
            tests: l.tests.iter().map(spec).collect(),
        }
    }
}

/// The tags every resource of a build carries.
pub fn build_tags(build: &Build) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kiln:build-id".to_string(), build.id.0.clone()),
        ("kiln:pipeline".to_string(), build.pipeline.clone()),
        ("kiln:version".to_string(), build.version()),
    ])
}

#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    pub region: String,
    pub image: ImageId,
    pub instance_type: String,
    /// Idempotency token: launching twice with it starts one instance.
    pub client_token: String,
    pub tags: BTreeMap<String, String>,
    pub infrastructure: Infrastructure,
    pub block_devices: Vec<BlockDevice>,
    pub user_data: Option<String>,
    /// A shutdown from inside terminates the instance (test instances); a builder only stops,
    /// since its volume becomes the image.
    pub terminate_on_shutdown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Pending,
    Available,
    Failed(String),
}

/// An image kiln made, as lifecycle rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub id: ImageId,
    pub name: String,
    pub created: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
    pub deprecated: Option<DateTime<Utc>>,
}

/// What DescribeImages says of an image a build starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFacts {
    pub state: ImageState,
    /// `x86_64`, `arm64`, …
    pub architecture: String,
    /// The root device's name (`/dev/xvda`, `/dev/sda1`), when the image has EBS mappings.
    pub root_device: Option<String>,
}

/// Instances and images.
pub trait Compute: Send + Sync {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId>;
    fn instance_state<'a>(
        &'a self,
        region: &'a str,
        id: &'a InstanceId,
    ) -> PortResult<'a, InstanceState>;
    fn stop<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()>;
    /// Terminating an instance that is gone already succeeds.
    fn terminate<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()>;
    /// Instances tagged with this build id that are not terminated.
    fn instances_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<InstanceId>>;
    /// Creates an image of a stopped instance, tagged (image and snapshots) with `tags`.
    fn create_image<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        name: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> PortResult<'a, ImageId>;
    fn image_state<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState>;
    /// The image as it is now; `None` when `region` has no such image (no eventual-consistency
    /// grace: for images that exist already, such as a parent).
    fn describe_image<'a>(
        &'a self,
        region: &'a str,
        id: &'a ImageId,
    ) -> PortResult<'a, Option<ImageFacts>>;
    /// The architectures each of `types` supports; types the cloud does not know are left out.
    fn instance_architectures<'a>(
        &'a self,
        region: &'a str,
        types: &'a [String],
    ) -> PortResult<'a, BTreeMap<String, Vec<String>>>;
    /// Images tagged with this build id in `region`.
    fn images_of<'a>(&'a self, region: &'a str, build: &'a BuildId)
        -> PortResult<'a, Vec<ImageId>>;
    fn copy_image<'a>(
        &'a self,
        from_region: &'a str,
        image: &'a ImageId,
        to_region: &'a str,
        copy: CopySpec<'a>,
    ) -> PortResult<'a, ImageId>;
    fn share_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        permission: &'a LaunchPermission,
    ) -> PortResult<'a, ()>;
    /// Deregisters the image and deletes its snapshots; a missing image succeeds.
    fn delete_image<'a>(&'a self, region: &'a str, image: &'a ImageId) -> PortResult<'a, ()>;
    /// The most recent image matching the filter.
    fn latest_image<'a>(
        &'a self,
        region: &'a str,
        filter: &'a ParentFilter,
    ) -> PortResult<'a, Option<ImageId>>;
    /// An image by name (embedded parent images, `parent.local`).
    fn image_named<'a>(&'a self, region: &'a str, name: &'a str)
        -> PortResult<'a, Option<ImageId>>;
    fn new_launch_template_version<'a>(
        &'a self,
        region: &'a str,
        template: &'a str,
        image: &'a ImageId,
        set_default: bool,
    ) -> PortResult<'a, ()>;
    /// Available images of `region` tagged `kiln:pipeline` = `pipeline`.
    fn pipeline_images<'a>(
        &'a self,
        region: &'a str,
        pipeline: &'a str,
    ) -> PortResult<'a, Vec<ImageInfo>>;
    /// Deprecates the image from `at` on (EC2 EnableImageDeprecation).
    fn deprecate_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        at: DateTime<Utc>,
    ) -> PortResult<'a, ()>;
}

/// What a copy of an image into another region is made with.
#[derive(Debug, Clone, Copy)]
pub struct CopySpec<'a> {
    pub name: &'a str,
    /// Idempotency token: copying twice with it makes one copy.
    pub client_token: &'a str,
    /// On the copy and its snapshots, set at creation.
    pub tags: &'a BTreeMap<String, String>,
    /// The key the copy's snapshots are encrypted with (the region's default EBS key when None).
    pub kms_key_id: Option<&'a str>,
}

/// What a customize or test command runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandPlan {
    pub build: BuildId,
    pub phases: Vec<PhaseName>,
    pub components: Vec<ComponentSpec>,
    pub working_directory: String,
    /// Customize: what the builder removes once the components succeeded (kiln's own files go
    /// always), recording what it removed for the test stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sanitize: Vec<crate::model::pipeline::SanitizeItem>,
    /// Test: check first that the image carries nothing of kiln and none of what the builder
    /// removed for these items (a test named `kiln-clean-image` in the report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_clean: Option<Vec<crate::model::pipeline::SanitizeItem>>,
    /// The stage's timeout: the command may not run longer, and what it is given to fetch and
    /// upload (presigned URLs on AWS) lives no longer (0: the default of six hours).
    #[serde(default)]
    pub timeout_minutes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CommandStatus {
    InProgress,
    Success,
    /// Which component and step failed, and the tail of its output.
    Failed {
        message: String,
        output_tail: String,
    },
}

/// The most bytes of one text field of a report (a name, a message, a tail) that kiln keeps:
/// the report is written on the instance, and its fields go into the build record and the
/// state machine's data (256 KiB at most there).
pub const REPORT_FIELD_CAP: usize = 4096;

/// The failed component and step a kiln-agent report names, and the tail of its output, each
/// field cut to [`REPORT_FIELD_CAP`] bytes (the tail keeps its end).
pub fn report_failure(report: &serde_json::Value) -> Option<(String, String)> {
    let f = report.get("failure")?;
    let text = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let head = |k: &str| cap_text(text(k), REPORT_FIELD_CAP, false);
    Some((
        cap_text(
            &format!(
                "component {}, {}/{}: {}",
                head("document"),
                head("phase"),
                head("step"),
                head("message")
            ),
            REPORT_FIELD_CAP,
            false,
        ),
        cap_text(text("outputTail"), REPORT_FIELD_CAP, true),
    ))
}

/// `text` cut to `max` bytes on a character boundary, keeping its start (or, `keep_end`, its
/// end), with a note of how much was cut.
pub fn cap_text(text: &str, max: usize, keep_end: bool) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    if keep_end {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("({start} bytes before) …{}", &text[start..])
    } else {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} more bytes)", &text[..end], text.len() - end)
    }
}

/// Commands on instances (SSM Run Command with kiln-agent, or the embedded agent).
pub trait Commands: Send + Sync {
    fn agent_online<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool>;
    fn send<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId>;
    fn status<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus>;
}

/// Pipelines, builds and locks. Status changes are conditional on the current status.
pub trait Store: Send + Sync {
    fn put_pipeline<'a>(&'a self, record: &'a PipelineRecord) -> PortResult<'a, ()>;
    fn pipeline<'a>(&'a self, name: &'a str) -> PortResult<'a, Option<PipelineRecord>>;
    /// The names of every applied pipeline (the daily lifecycle run).
    fn pipeline_names(&self) -> PortResult<'_, Vec<String>>;
    /// Creates the build record; creating the same id twice with the same content succeeds.
    fn create_build<'a>(&'a self, build: &'a Build) -> PortResult<'a, ()>;
    /// Saves `build` if the stored one is in `expected` (or may move to the new status from it).
    fn save_build<'a>(&'a self, build: &'a Build, expected: BuildStatus) -> PortResult<'a, ()>;
    fn build<'a>(&'a self, pipeline: &'a str, id: &'a BuildId) -> PortResult<'a, Option<Build>>;
    fn builds<'a>(&'a self, pipeline: &'a str) -> PortResult<'a, Vec<Build>>;
    /// Takes the pipeline's lock for `build`; `Kiln.Locked` naming the holder when taken.
    fn lock<'a>(
        &'a self,
        pipeline: &'a str,
        build: &'a BuildId,
        now: DateTime<Utc>,
        ttl_seconds: i64,
    ) -> PortResult<'a, ()>;
    /// Releases the lock if `build` holds it.
    fn unlock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId) -> PortResult<'a, ()>;
}

/// "Kiln Image State Change" events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildEvent {
    pub pipeline: String,
    pub version: String,
    pub build: BuildId,
    pub state: BuildStatus,
    pub images: BTreeMap<String, ImageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Anything else the event announces (a schedule disabled by the failure policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl BuildEvent {
    pub fn of(build: &Build) -> BuildEvent {
        BuildEvent {
            pipeline: build.pipeline.clone(),
            version: build.version(),
            build: build.id.clone(),
            state: build.status,
            images: build
                .regions
                .iter()
                .filter_map(|r| r.image.clone().map(|i| (r.region.clone(), i)))
                .collect(),
            failure_reason: build
                .failure
                .as_ref()
                .map(|f| format!("{}: {}", f.error, f.message)),
            note: None,
        }
    }
}

pub trait Events: Send + Sync {
    fn emit<'a>(&'a self, event: &'a BuildEvent) -> PortResult<'a, ()>;
}

/// SSM parameters: parent image ids in, new image ids out.
pub trait Parameters: Send + Sync {
    fn get<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<String>>;
    fn put<'a>(&'a self, region: &'a str, name: &'a str, value: &'a str) -> PortResult<'a, ()>;
}

/// What starts pipelines on their own: schedules and event rules (EventBridge Scheduler and
/// rules in AWS, the embedded store's schedules for `kiln serve`).
pub trait Triggers: Send + Sync {
    /// Disables the pipeline's schedule and event rules, recording `reason`; false when the
    /// pipeline has none enabled.
    fn disable<'a>(&'a self, pipeline: &'a str, reason: &'a str) -> PortResult<'a, bool>;
}

/// Task tokens waiting for an event (see `stages::wake`): the stack keeps them in its table and
/// answers them with Step Functions' SendTaskSuccess; the embedded engine keeps them in memory.
pub trait Wakeups: Send + Sync {
    /// Keeps `token` until an event announces one of `awaited.until`.
    fn register<'a>(&'a self, token: &'a str, awaited: &'a Awaited) -> PortResult<'a, ()>;
    /// The tokens kept for `region`'s resource `id`, with what each awaits.
    fn registered<'a>(
        &'a self,
        region: &'a str,
        id: &'a str,
    ) -> PortResult<'a, Vec<(String, Awaited)>>;
    /// Answers `token` with `output` (SendTaskSuccess) and forgets it; false when its task no
    /// longer waits (answered already, timed out, its execution over).
    fn wake<'a>(
        &'a self,
        token: &'a str,
        awaited: &'a Awaited,
        output: &'a serde_json::Value,
    ) -> PortResult<'a, bool>;
}

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Everything a stage may use.
#[derive(Clone, Copy)]
pub struct Ports<'a> {
    pub compute: &'a dyn Compute,
    pub commands: &'a dyn Commands,
    pub store: &'a dyn Store,
    pub events: &'a dyn Events,
    pub parameters: &'a dyn Parameters,
    pub triggers: &'a dyn Triggers,
    pub wakeups: &'a dyn Wakeups,
    pub clock: &'a dyn Clock,
}

impl<'a> Ports<'a> {
    /// Every port from one provider that implements them all.
    pub fn all<P>(provider: &'a P, clock: &'a dyn Clock) -> Ports<'a>
    where
        P: Compute + Commands + Store + Events + Parameters + Triggers + Wakeups,
    {
        Ports {
            compute: provider,
            commands: provider,
            store: provider,
            events: provider,
            parameters: provider,
            triggers: provider,
            wakeups: provider,
            clock,
        }
    }
}

impl std::fmt::Debug for Ports<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ports")
    }
}

/// The port calls a piece of code may make, one bit per method of the port traits
/// ([`calls`]). Each stage function declares its own
/// ([`crate::stages::handler::Function::uses`]): its Lambda bootstrap links the AWS operations
/// of those calls and no others, and every run of the stage code (Lambda, embedded, the tests,
/// the simulation) refuses the rest, so a call outside the declaration fails wherever it runs.
pub type Calls = u64;

/// Ports narrowed to the calls `M` names: each other call fails with `Kiln.Internal`, naming
/// the function and the call. `P` is the ports' provider: the AWS ports in a Lambda bootstrap
/// (calls resolved statically, so the refused calls' AWS code is not linked), or any
/// [`Ports`] where the stage code runs elsewhere.
pub struct Select<'p, P: ?Sized, const M: Calls> {
    inner: &'p P,
    /// The function that holds these calls.
    holder: &'static str,
}

impl<P: ?Sized, const M: Calls> std::fmt::Debug for Select<'_, P, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Select({}, {M:#x})", self.holder)
    }
}

impl<'p, P: ?Sized, const M: Calls> Select<'p, P, M> {
    pub fn new(inner: &'p P, holder: &'static str) -> Select<'p, P, M> {
        Select { inner, holder }
    }

    fn refuse<'r, T: Send + 'r>(&self, port: &str, call: &str) -> PortResult<'r, T> {
        let message = format!(
            "the {} function does not call {port}.{call} (declare it in Function::uses)",
            self.holder
        );
        Box::pin(async move { Err(StageError::new(crate::errors::ErrorKind::Internal, message)) })
    }
}

impl<'p, P, const M: Calls> Select<'p, P, M>
where
    P: ?Sized + Compute + Commands + Store + Events + Parameters + Triggers + Wakeups,
{
    /// The selected calls as ports (the clock is the inner one's, or the system's).
    pub fn ports(&self, clock: &'p dyn Clock) -> Ports<'_> {
        Ports::all(self, clock)
    }
}

/// From one list of the port traits' methods: the [`calls`] bits, the [`Select`] of each trait
/// (a refused call never names the inner one's method), and each trait for [`Ports`] itself
/// (forwarding to its field), so that [`Select`] narrows any ports.
macro_rules! port_calls {
    ($(
        $trait:ident . $field:ident {
            $( $bit:ident = $n:literal : fn $name:ident $(<$lt:lifetime>)? (& $($slt:lifetime)? self $(, $arg:ident : $ty:ty)* ) -> $ret:ty ; )*
        }
    )*) => {
        /// One bit per port method: `COMPUTE_LAUNCH` is `compute.launch`.
        pub mod calls {
            use super::Calls;
            $($( pub const $bit: Calls = 1 << $n; )*)*
        }
        $(
            impl<P: ?Sized + $trait, const M: Calls> $trait for Select<'_, P, M> {
                $(
                    #[inline]
                    fn $name $(<$lt>)? (& $($slt)? self $(, $arg: $ty)*) -> $ret {
                        if M & calls::$bit != 0 {
                            self.inner.$name($($arg),*)
                        } else {
                            self.refuse(stringify!($field), stringify!($name))
                        }
                    }
                )*
            }
            impl $trait for Ports<'_> {
                $(
                    fn $name $(<$lt>)? (& $($slt)? self $(, $arg: $ty)*) -> $ret {
                        self.$field.$name($($arg),*)
                    }
                )*
            }
        )*
    };
}

port_calls! {
    Compute.compute {
        COMPUTE_LAUNCH = 0: fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId>;
        COMPUTE_INSTANCE_STATE = 1: fn instance_state<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, InstanceState>;
        COMPUTE_STOP = 2: fn stop<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()>;
        COMPUTE_TERMINATE = 3: fn terminate<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()>;
        COMPUTE_INSTANCES_OF = 4: fn instances_of<'a>(&'a self, region: &'a str, build: &'a BuildId) -> PortResult<'a, Vec<InstanceId>>;
        COMPUTE_CREATE_IMAGE = 5: fn create_image<'a>(&'a self, region: &'a str, instance: &'a InstanceId, name: &'a str, tags: &'a BTreeMap<String, String>) -> PortResult<'a, ImageId>;
        COMPUTE_IMAGE_STATE = 6: fn image_state<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState>;
        COMPUTE_DESCRIBE_IMAGE = 7: fn describe_image<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, Option<ImageFacts>>;
        COMPUTE_INSTANCE_ARCHITECTURES = 8: fn instance_architectures<'a>(&'a self, region: &'a str, types: &'a [String]) -> PortResult<'a, BTreeMap<String, Vec<String>>>;
        COMPUTE_IMAGES_OF = 9: fn images_of<'a>(&'a self, region: &'a str, build: &'a BuildId) -> PortResult<'a, Vec<ImageId>>;
        COMPUTE_COPY_IMAGE = 10: fn copy_image<'a>(&'a self, from_region: &'a str, image: &'a ImageId, to_region: &'a str, copy: CopySpec<'a>) -> PortResult<'a, ImageId>;
        COMPUTE_SHARE_IMAGE = 11: fn share_image<'a>(&'a self, region: &'a str, image: &'a ImageId, permission: &'a LaunchPermission) -> PortResult<'a, ()>;
        COMPUTE_DELETE_IMAGE = 12: fn delete_image<'a>(&'a self, region: &'a str, image: &'a ImageId) -> PortResult<'a, ()>;
        COMPUTE_LATEST_IMAGE = 13: fn latest_image<'a>(&'a self, region: &'a str, filter: &'a ParentFilter) -> PortResult<'a, Option<ImageId>>;
        COMPUTE_IMAGE_NAMED = 14: fn image_named<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<ImageId>>;
        COMPUTE_NEW_LAUNCH_TEMPLATE_VERSION = 15: fn new_launch_template_version<'a>(&'a self, region: &'a str, template: &'a str, image: &'a ImageId, set_default: bool) -> PortResult<'a, ()>;
        COMPUTE_PIPELINE_IMAGES = 16: fn pipeline_images<'a>(&'a self, region: &'a str, pipeline: &'a str) -> PortResult<'a, Vec<ImageInfo>>;
        COMPUTE_DEPRECATE_IMAGE = 17: fn deprecate_image<'a>(&'a self, region: &'a str, image: &'a ImageId, at: DateTime<Utc>) -> PortResult<'a, ()>;
    }
    Commands.commands {
        COMMANDS_AGENT_ONLINE = 18: fn agent_online<'a>(&'a self, region: &'a str, instance: &'a InstanceId) -> PortResult<'a, bool>;
        COMMANDS_SEND = 19: fn send<'a>(&'a self, region: &'a str, instance: &'a InstanceId, plan: &'a CommandPlan) -> PortResult<'a, CommandId>;
        COMMANDS_STATUS = 20: fn status<'a>(&'a self, region: &'a str, instance: &'a InstanceId, command: &'a CommandId) -> PortResult<'a, CommandStatus>;
    }
    Store.store {
        STORE_PUT_PIPELINE = 21: fn put_pipeline<'a>(&'a self, record: &'a PipelineRecord) -> PortResult<'a, ()>;
        STORE_PIPELINE = 22: fn pipeline<'a>(&'a self, name: &'a str) -> PortResult<'a, Option<PipelineRecord>>;
        STORE_PIPELINE_NAMES = 23: fn pipeline_names(&self) -> PortResult<'_, Vec<String>>;
        STORE_CREATE_BUILD = 24: fn create_build<'a>(&'a self, build: &'a Build) -> PortResult<'a, ()>;
        STORE_SAVE_BUILD = 25: fn save_build<'a>(&'a self, build: &'a Build, expected: BuildStatus) -> PortResult<'a, ()>;
        STORE_BUILD = 26: fn build<'a>(&'a self, pipeline: &'a str, id: &'a BuildId) -> PortResult<'a, Option<Build>>;
        STORE_BUILDS = 27: fn builds<'a>(&'a self, pipeline: &'a str) -> PortResult<'a, Vec<Build>>;
        STORE_LOCK = 28: fn lock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId, now: DateTime<Utc>, ttl_seconds: i64) -> PortResult<'a, ()>;
        STORE_UNLOCK = 29: fn unlock<'a>(&'a self, pipeline: &'a str, build: &'a BuildId) -> PortResult<'a, ()>;
    }
    Events.events {
        EVENTS_EMIT = 30: fn emit<'a>(&'a self, event: &'a BuildEvent) -> PortResult<'a, ()>;
    }
    Parameters.parameters {
        PARAMETERS_GET = 31: fn get<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<String>>;
        PARAMETERS_PUT = 32: fn put<'a>(&'a self, region: &'a str, name: &'a str, value: &'a str) -> PortResult<'a, ()>;
    }
    Triggers.triggers {
        TRIGGERS_DISABLE = 33: fn disable<'a>(&'a self, pipeline: &'a str, reason: &'a str) -> PortResult<'a, bool>;
    }
    Wakeups.wakeups {
        WAKEUPS_REGISTER = 34: fn register<'a>(&'a self, token: &'a str, awaited: &'a Awaited) -> PortResult<'a, ()>;
        WAKEUPS_REGISTERED = 35: fn registered<'a>(&'a self, region: &'a str, id: &'a str) -> PortResult<'a, Vec<(String, Awaited)>>;
        WAKEUPS_WAKE = 36: fn wake<'a>(&'a self, token: &'a str, awaited: &'a Awaited, output: &'a serde_json::Value) -> PortResult<'a, bool>;
    }
}

/// Something that offers the ports (the AWS clients, the embedded cloud, the in-memory cloud).
pub trait PortsProvider: Send + Sync {
    fn ports(&self) -> Ports<'_>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fields_are_capped_and_cut_on_character_boundaries() {
        // GIVEN a report whose message and tail are 6,000 bytes of two-byte characters
        let long = "é".repeat(3000);
        let report = serde_json::json!({"failure": {
            "document": "c", "phase": "build", "step": "s",
            "message": long, "outputTail": format!("{long}the end"),
        }});
        // WHEN kiln reads its failure
        let (message, tail) = report_failure(&report).expect("a failure");
        // THEN both are cut near the cap, the message keeping its start, the tail its end
        assert!(message.len() <= REPORT_FIELD_CAP + 64, "{}", message.len());
        assert!(message.starts_with("component c, build/s: éé"));
        assert!(message.contains("more bytes"), "{message}");
        assert!(tail.len() <= REPORT_FIELD_CAP + 64, "{}", tail.len());
        assert!(tail.ends_with("the end") && tail.contains("bytes before"));
        // AND a small failure passes verbatim
        let small = serde_json::json!({"failure": {
            "document": "c", "phase": "build", "step": "s",
            "message": "exit 3", "outputTail": "line 1\nline 2",
        }});
        assert_eq!(
            report_failure(&small),
            Some((
                "component c, build/s: exit 3".to_string(),
                "line 1\nline 2".to_string()
            ))
        );
    }
}
