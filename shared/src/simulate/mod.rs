//! `kiln simulate`: the real state machine and the real stage code in virtual time, over a cloud
//! whose every operation takes a latency drawn from a table of published figures
//! (`latencies.json`, each row naming its source). A build's time, its critical path, what it
//! bills, and how long each wait idled after AWS was done, before running it.
//!
//! [`SimCloud`] wraps a cloud that answers at once (the in-memory cloud) and holds each answer
//! back until the drawn time has passed: an instance is pending until it is running, an image
//! pending until it is available, a command in progress until its steps have run, a new
//! resource unknown to Describe calls for a moment. Time is tokio's, paused: it jumps to the next
//! timer whenever every task waits, so concurrent branches wait side by side.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::clock::{Clock as EngineClock, TokioClock};
pub use crate::engine::rng::Rng;
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{BuildId, CommandId, ImageId, InstanceId};
use crate::model::pipeline::{LaunchPermission, ParentFilter};
use crate::ports::*;

/// The stage functions' memory (`Globals.Function.MemorySize` in infra/template.yaml; a test
/// keeps the two equal), what their GB-seconds are billed at.
pub const LAMBDA_MEMORY_MB: u32 = 256;

/// The built-in table.
pub const LATENCIES: &str = include_str!("latencies.json");

/// One operation's latency: log-normal through `p50` and `p90`, plus `per_gib` seconds per GiB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Row {
    pub operation: String,
    pub what: String,
    pub p50: f64,
    pub p90: f64,
    #[serde(default, rename = "perGiB", skip_serializing_if = "Option::is_none")]
    pub per_gib: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_continent_factor: Option<f64>,
    pub source: String,
}

/// What a build's resources cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Prices {
    #[serde(default)]
    pub comment: String,
    pub instance_hour: BTreeMap<String, f64>,
    #[serde(rename = "ebsGp3GiBMonth")]
    pub ebs_gp3_gib_month: f64,
    #[serde(rename = "lambdaGiBSecond")]
    pub lambda_gib_second: BTreeMap<String, f64>,
    pub lambda_request: f64,
    pub step_functions_transition: f64,
    #[serde(rename = "interRegionGiB")]
    pub inter_region_gib: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    #[serde(default)]
    pub comment: String,
    pub rows: Vec<Row>,
    pub prices: Prices,
}

/// The operations the simulated cloud draws; a table must have each.
pub const OPERATIONS: [&str; 13] = [
    "api.call",
    "ec2.run-instances.api",
    "ec2.instance.running",
    "ssm.agent.online",
    "ssm.command.overhead",
    "command.step",
    "ec2.instance.stopped",
    "ec2.image.available",
    "ec2.copy.available",
    "ec2.describe.consistency",
    "lambda.invoke",
    "lambda.cold-start",
    "events.delivery",
];

impl Table {
    pub fn builtin() -> Table {
        Table::parse(LATENCIES).expect("the built-in latency table is valid")
    }

    pub fn parse(text: &str) -> Result<Table, String> {
        let t: Table = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for op in OPERATIONS {
            if !t.rows.iter().any(|r| r.operation == op) {
                return Err(format!(
                    "the latency table has no row `{op}` (it needs: {})",
                    OPERATIONS.join(", ")
                ));
            }
        }
        if let Some(r) = t
            .rows
            .iter()
            .find(|r| !(r.p50 > 0.0 && r.p90 >= r.p50) || r.source.trim().is_empty())
        {
            return Err(format!(
                "row `{}`: p50 must be above 0, p90 at least p50, and the row must name its source",
                r.operation
            ));
        }
        Ok(t)
    }

    pub fn row(&self, op: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.operation == op)
            .expect("parse checked every operation")
    }

    /// A draw for `op` with `gib` GiB of volume and `factor` applied.
    pub fn draw(&self, op: &str, rng: &mut Rng, gib: f64, factor: f64) -> Duration {
        let r = self.row(op);
        // z = 1.2816 at the 90th percentile of the standard normal.
        let sigma = (r.p90 / r.p50).ln() / 1.281_551_6;
        let scale = (sigma * rng.normal()).exp();
        let secs = (r.p50 + r.per_gib.unwrap_or(0.0) * gib) * factor * scale;
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// A wait a stage did: when AWS was done, and when kiln noticed.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub what: &'static str,
    pub resource: String,
    pub ready: DateTime<Utc>,
    pub noticed: DateTime<Utc>,
}

impl Wait {
    /// Seconds between AWS being done and kiln noticing.
    pub fn idle_seconds(&self) -> f64 {
        (self.noticed - self.ready).num_milliseconds().max(0) as f64 / 1000.0
    }
}

#[derive(Debug, Clone)]
struct Inst {
    instance_type: String,
    launched: DateTime<Utc>,
    visible: DateTime<Utc>,
    running: DateTime<Utc>,
    online: DateTime<Utc>,
    stopped: Option<DateTime<Utc>>,
    terminated: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Img {
    visible: DateTime<Utc>,
    available: DateTime<Utc>,
}

/// What one simulated build used, as EC2 bills it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Instance seconds by type (launch to terminate: EC2 stops billing at shutting-down).
    pub instance_seconds: BTreeMap<String, f64>,
    /// GiB-seconds of the instances' root volumes.
    pub volume_gib_seconds: f64,
    /// GiB copied to other regions.
    pub copied_gib: f64,
    /// API requests by operation.
    pub requests: BTreeMap<&'static str, usize>,
}

#[derive(Debug, Default)]
struct SimState {
    instances: HashMap<InstanceId, Inst>,
    images: HashMap<ImageId, Img>,
    commands: HashMap<CommandId, DateTime<Utc>>,
    waits: Vec<Wait>,
    copied_gib: f64,
    requests: BTreeMap<&'static str, usize>,
}

/// A cloud whose answers wait for the drawn latencies; `P` answers at once.
pub struct SimCloud<P> {
    inner: P,
    table: Table,
    clock: Arc<TokioClock>,
    rng: Mutex<Rng>,
    state: Mutex<SimState>,
    volume_gib: f64,
    data_gib: f64,
    step_seconds: Option<f64>,
    /// The simulated EventBridge: the tokens kept, the events on their way, the share lost.
    kept: crate::stages::wake::KeptTokens,
    deliveries: Mutex<Vec<(DateTime<Utc>, crate::stages::wake::Announced)>>,
    delivery_added: tokio::sync::Notify,
    lost_events: f64,
    /// Events delivered (each a wake function invocation by its rule), and events lost.
    events: Mutex<(usize, usize)>,
    /// The billed seconds of the wake function's invocations by the rules (one per event).
    event_billed: Mutex<Vec<f64>>,
}

/// The sizes a simulated build's image has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    /// The root volume (EBS billed while an instance runs).
    pub volume_gib: f64,
    /// What the image's snapshots hold (snapshot and copy time, transfer billed).
    pub data_gib: f64,
}

impl<P> std::fmt::Debug for SimCloud<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCloud")
            .field("volume_gib", &self.volume_gib)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn at(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Regions on different continents (`us-`, `eu-`, `ap-`, … differ).
fn continents_differ(a: &str, b: &str) -> bool {
    let c = |r: &str| r.split('-').next().unwrap_or_default().to_string();
    let (ca, cb) = (c(a), c(b));
    let america = |x: &str| matches!(x, "us" | "ca" | "sa" | "mx");
    !(ca == cb || (america(&ca) && america(&cb) && ca != "sa" && cb != "sa"))
}

fn not_found(what: &str, id: &str, code: &str) -> StageError {
    StageError::new(
        ErrorKind::Retryable,
        format!("{what} {id} does not exist (yet)"),
    )
    .with_code(code)
}

impl<P: PortsProvider> SimCloud<P> {
    /// `step_seconds`: a component step's time in place of the table's `command.step`.
    pub fn new(
        inner: P,
        table: Table,
        clock: Arc<TokioClock>,
        seed: u64,
        sizes: Sizes,
        step_seconds: Option<f64>,
    ) -> Self {
        SimCloud {
            inner,
            table,
            clock,
            rng: Mutex::new(Rng::seeded(seed)),
            state: Mutex::new(SimState::default()),
            volume_gib: sizes.volume_gib,
            data_gib: sizes.data_gib,
            step_seconds,
            kept: Default::default(),
            deliveries: Mutex::new(Vec::new()),
            delivery_added: tokio::sync::Notify::new(),
            lost_events: 0.0,
            events: Mutex::new((0, 0)),
            event_billed: Mutex::new(Vec::new()),
        }
    }

    /// A share (0 to 1) of the events AWS sends that never arrive (they are best effort): the
    /// waits for them end by the Task's timeout, the bounded poll.
    pub fn with_lost_events(mut self, share: f64) -> Self {
        self.lost_events = share.clamp(0.0, 1.0);
        self
    }

    /// The tokens the engine's `.waitForTaskToken` tasks wait on, answered by this cloud's events.
    pub fn task_tokens(&self) -> Arc<crate::engine::tokens::TaskTokens> {
        self.kept.tokens()
    }

    /// Events delivered and events lost.
    pub fn events(&self) -> (usize, usize) {
        *lock(&self.events)
    }

    /// The billed seconds of each invocation of the wake function by an event's rule.
    pub fn event_invocations(&self) -> Vec<f64> {
        lock(&self.event_billed).clone()
    }

    /// When what `awaited` names reaches a state its wait ends in, and that state, as far as
    /// this cloud has decided it (an instance not yet told to stop has no stop time).
    fn settles(&self, awaited: &crate::model::build::Awaited) -> Option<(DateTime<Utc>, String)> {
        use crate::model::build::AwaitedKind;
        let s = lock(&self.state);
        let until = |state: &str| awaited.until.iter().any(|u| u == state);
        match awaited.kind {
            AwaitedKind::Instance => {
                let i = s.instances.get(&InstanceId(awaited.id.clone()))?;
                if until("stopped") {
                    i.stopped.map(|t| (t, "stopped".into()))
                } else if until("running") {
                    Some((i.running, "running".into()))
                } else {
                    None
                }
            }
            AwaitedKind::Image => s
                .images
                .get(&ImageId(awaited.id.clone()))
                .map(|i| (i.available, "available".into())),
            AwaitedKind::Command => s
                .commands
                .get(&CommandId(awaited.id.clone()))
                .map(|t| (*t, "Success".into())),
        }
    }

    /// The simulated EventBridge: delivers each event when its time comes, to the rule's
    /// target (the wake code). Runs beside the execution; never returns.
    pub async fn deliver_events(&self)
    where
        P: PortsProvider,
    {
        loop {
            let next = lock(&self.deliveries).iter().map(|(t, _)| *t).min();
            match next {
                None => self.delivery_added.notified().await,
                Some(t) => {
                    let wait = (t - self.now()).to_std().unwrap_or_default();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.delivery_added.notified() => continue,
                    }
                    let now = self.now();
                    let due: Vec<_> = {
                        let mut d = lock(&self.deliveries);
                        let (due, later) = d.drain(..).partition(|(t, _)| *t <= now);
                        *d = later;
                        due
                    };
                    for (_, a) in due {
                        lock(&self.events).0 += 1;
                        // The rule's target runs: a Lambda invocation, billed as one.
                        let billed = self.draw("lambda.invoke", 0.0, 1.0).as_secs_f64();
                        lock(&self.event_billed).push(billed);
                        let _ = crate::stages::wake::announce(&self.ports(), &a).await;
                    }
                }
            }
        }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    fn now(&self) -> DateTime<Utc> {
        EngineClock::now(self.clock.as_ref())
    }

    pub fn draw(&self, op: &str, gib: f64, factor: f64) -> Duration {
        self.table.draw(op, &mut lock(&self.rng), gib, factor)
    }

    /// One request: its latency, counted by operation.
    async fn request(&self, operation: &'static str) {
        let d = if operation == "RunInstances" {
            self.draw("ec2.run-instances.api", 0.0, 1.0)
        } else {
            self.draw("api.call", 0.0, 1.0)
        };
        *lock(&self.state).requests.entry(operation).or_default() += 1;
        tokio::time::sleep(d).await;
    }

    /// Records that a check saw `resource` done (the first time only).
    fn noticed(&self, what: &'static str, resource: &str, ready: DateTime<Utc>) {
        let now = self.now();
        let mut s = lock(&self.state);
        if !s
            .waits
            .iter()
            .any(|w| w.what == what && w.resource == resource)
        {
            s.waits.push(Wait {
                what,
                resource: resource.to_string(),
                ready,
                noticed: now,
            });
        }
    }

    /// Every wait the build did.
    pub fn waits(&self) -> Vec<Wait> {
        lock(&self.state).waits.clone()
    }

    /// What the build used, up to `end` for what is still running.
    pub fn usage(&self, end: DateTime<Utc>) -> Usage {
        let s = lock(&self.state);
        let mut u = Usage {
            copied_gib: s.copied_gib,
            requests: s.requests.clone(),
            ..Usage::default()
        };
        for i in s.instances.values() {
            let secs =
                (i.terminated.unwrap_or(end) - i.launched).num_milliseconds() as f64 / 1000.0;
            *u.instance_seconds
                .entry(i.instance_type.clone())
                .or_default() += secs;
            u.volume_gib_seconds += secs * self.volume_gib;
        }
        u
    }

    fn steps_of(plan: &CommandPlan) -> usize {
        let phases: Vec<&str> = plan.phases.iter().map(|p| p.as_str()).collect();
        plan.components
            .iter()
            .flat_map(|c| c.document["phases"].as_array().cloned().unwrap_or_default())
            .filter(|p| p["name"].as_str().is_some_and(|n| phases.contains(&n)))
            .map(|p| p["steps"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
            + usize::from(plan.verify_clean.is_some())
            + usize::from(!plan.sanitize.is_empty())
    }
}

impl<P: PortsProvider> Compute for SimCloud<P> {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId> {
        Box::pin(async move {
            self.request("RunInstances").await;
            let id = self.inner.ports().compute.launch(spec).await?;
            let now = self.now();
            let mut s = lock(&self.state);
            if !s.instances.contains_key(&id) {
                let running = at(now, self.draw("ec2.instance.running", 0.0, 1.0));
                let online = at(running, self.draw("ssm.agent.online", 0.0, 1.0));
                let visible = at(now, self.draw("ec2.describe.consistency", 0.0, 1.0));
                s.instances.insert(
                    id.clone(),
                    Inst {
                        instance_type: spec.instance_type.clone(),
                        launched: now,
                        visible,
                        running,
                        online,
                        stopped: None,
                        terminated: None,
                    },
                );
            }
            Ok(id)
        })
    }

    fn instance_state<'a>(
        &'a self,
        region: &'a str,
        id: &'a InstanceId,
    ) -> PortResult<'a, InstanceState> {
        Box::pin(async move {
            self.request("DescribeInstances").await;
            let now = self.now();
            let i = lock(&self.state).instances.get(id).cloned();
            if let Some(i) = &i {
                if now < i.visible {
                    return Err(not_found(
                        "instance",
                        id.as_str(),
                        "InvalidInstanceID.NotFound",
                    ));
                }
            }
            let state = self
                .inner
                .ports()
                .compute
                .instance_state(region, id)
                .await?;
            let Some(i) = i else { return Ok(state) };
            Ok(match state {
                InstanceState::Running if now < i.running => InstanceState::Pending,
                InstanceState::Running => {
                    self.noticed("instance running", id.as_str(), i.running);
                    InstanceState::Running
                }
                InstanceState::Stopped => match i.stopped {
                    Some(t) if now < t => InstanceState::Stopping,
                    Some(t) => {
                        self.noticed("instance stopped", id.as_str(), t);
                        InstanceState::Stopped
                    }
                    None => InstanceState::Stopped,
                },
                other => other,
            })
        })
    }

    fn stop<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.request("StopInstances").await;
            self.inner.ports().compute.stop(region, id).await?;
            let now = self.now();
            let d = self.draw("ec2.instance.stopped", 0.0, 1.0);
            if let Some(i) = lock(&self.state).instances.get_mut(id) {
                i.stopped.get_or_insert(at(now, d));
            }
            Ok(())
        })
    }

    fn terminate<'a>(&'a self, region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.request("TerminateInstances").await;
            self.inner.ports().compute.terminate(region, id).await?;
            let now = self.now();
            if let Some(i) = lock(&self.state).instances.get_mut(id) {
                i.terminated.get_or_insert(now);
            }
            Ok(())
        })
    }

    fn instances_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<InstanceId>> {
        Box::pin(async move {
            self.request("DescribeInstances").await;
            self.inner.ports().compute.instances_of(region, build).await
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
            self.request("CreateImage").await;
            let id = self
                .inner
                .ports()
                .compute
                .create_image(region, instance, name, tags)
                .await?;
            let now = self.now();
            let available = at(now, self.draw("ec2.image.available", self.data_gib, 1.0));
            let visible = at(now, self.draw("ec2.describe.consistency", 0.0, 1.0));
            lock(&self.state)
                .images
                .entry(id.clone())
                .or_insert(Img { visible, available });
            Ok(id)
        })
    }

    fn image_state<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            let now = self.now();
            let i = lock(&self.state).images.get(id).cloned();
            if let Some(i) = &i {
                if now < i.visible {
                    return Err(not_found("image", id.as_str(), "InvalidAMIID.NotFound"));
                }
            }
            let state = self.inner.ports().compute.image_state(region, id).await?;
            Ok(match (state, i) {
                (ImageState::Available, Some(i)) if now < i.available => ImageState::Pending,
                (ImageState::Available, Some(i)) => {
                    self.noticed("image available", id.as_str(), i.available);
                    ImageState::Available
                }
                (s, _) => s,
            })
        })
    }

    fn describe_image<'a>(
        &'a self,
        region: &'a str,
        id: &'a ImageId,
    ) -> PortResult<'a, Option<ImageFacts>> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            self.inner.ports().compute.describe_image(region, id).await
        })
    }

    fn instance_architectures<'a>(
        &'a self,
        region: &'a str,
        types: &'a [String],
    ) -> PortResult<'a, BTreeMap<String, Vec<String>>> {
        Box::pin(async move {
            self.request("DescribeInstanceTypes").await;
            self.inner
                .ports()
                .compute
                .instance_architectures(region, types)
                .await
        })
    }

    fn images_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<ImageId>> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            self.inner.ports().compute.images_of(region, build).await
        })
    }

    fn copy_image<'a>(
        &'a self,
        from_region: &'a str,
        image: &'a ImageId,
        to_region: &'a str,
        copy: CopySpec<'a>,
    ) -> PortResult<'a, ImageId> {
        Box::pin(async move {
            self.request("CopyImage").await;
            let id = self
                .inner
                .ports()
                .compute
                .copy_image(from_region, image, to_region, copy)
                .await?;
            let now = self.now();
            let factor = if continents_differ(from_region, to_region) {
                self.table
                    .row("ec2.copy.available")
                    .cross_continent_factor
                    .unwrap_or(1.0)
            } else {
                1.0
            };
            let available = at(now, self.draw("ec2.copy.available", self.data_gib, factor));
            let visible = at(now, self.draw("ec2.describe.consistency", 0.0, 1.0));
            let mut s = lock(&self.state);
            if !s.images.contains_key(&id) {
                s.copied_gib += self.data_gib;
                s.images.insert(id.clone(), Img { visible, available });
            }
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
            self.request("ModifyImageAttribute").await;
            self.inner
                .ports()
                .compute
                .share_image(region, image, permission)
                .await
        })
    }

    fn delete_image<'a>(&'a self, region: &'a str, image: &'a ImageId) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.request("DeregisterImage").await;
            self.inner.ports().compute.delete_image(region, image).await
        })
    }

    fn latest_image<'a>(
        &'a self,
        region: &'a str,
        filter: &'a ParentFilter,
    ) -> PortResult<'a, Option<ImageId>> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            self.inner
                .ports()
                .compute
                .latest_image(region, filter)
                .await
        })
    }

    fn image_named<'a>(
        &'a self,
        region: &'a str,
        name: &'a str,
    ) -> PortResult<'a, Option<ImageId>> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            self.inner.ports().compute.image_named(region, name).await
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
            self.request("CreateLaunchTemplateVersion").await;
            self.inner
                .ports()
                .compute
                .new_launch_template_version(region, template, image, set_default)
                .await
        })
    }

    fn pipeline_images<'a>(
        &'a self,
        region: &'a str,
        pipeline: &'a str,
    ) -> PortResult<'a, Vec<ImageInfo>> {
        Box::pin(async move {
            self.request("DescribeImages").await;
            self.inner
                .ports()
                .compute
                .pipeline_images(region, pipeline)
                .await
        })
    }

    fn deprecate_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        at: DateTime<Utc>,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.request("EnableImageDeprecation").await;
            self.inner
                .ports()
                .compute
                .deprecate_image(region, image, at)
                .await
        })
    }
}

impl<P: PortsProvider> Commands for SimCloud<P> {
    fn agent_online<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool> {
        Box::pin(async move {
            self.request("DescribeInstanceInformation").await;
            let online = self
                .inner
                .ports()
                .commands
                .agent_online(region, instance)
                .await?;
            let now = self.now();
            let at_ = lock(&self.state).instances.get(instance).map(|i| i.online);
            Ok(match at_ {
                Some(t) if online && now >= t => {
                    self.noticed("agent online", instance.as_str(), t);
                    true
                }
                Some(_) => false,
                None => online,
            })
        })
    }

    fn send<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId> {
        Box::pin(async move {
            self.request("SendCommand").await;
            let id = self
                .inner
                .ports()
                .commands
                .send(region, instance, plan)
                .await?;
            let now = self.now();
            let mut run = self.draw("ssm.command.overhead", 0.0, 1.0);
            for _ in 0..Self::steps_of(plan) {
                run += match self.step_seconds {
                    Some(s) => Duration::from_secs_f64(s),
                    None => self.draw("command.step", 0.0, 1.0),
                };
            }
            lock(&self.state)
                .commands
                .entry(id.clone())
                .or_insert(at(now, run));
            Ok(id)
        })
    }

    fn status<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus> {
        Box::pin(async move {
            self.request("GetCommandInvocation").await;
            let now = self.now();
            let done = lock(&self.state).commands.get(command).copied();
            if let Some(t) = done {
                if now < t {
                    return Ok(CommandStatus::InProgress);
                }
            }
            let status = self
                .inner
                .ports()
                .commands
                .status(region, instance, command)
                .await?;
            if let (Some(t), false) = (done, status == CommandStatus::InProgress) {
                self.noticed("command done", command.as_str(), t);
            }
            Ok(status)
        })
    }
}

impl<P: PortsProvider> Clock for SimCloud<P> {
    fn now(&self) -> DateTime<Utc> {
        EngineClock::now(self.clock.as_ref())
    }
}

impl<P: PortsProvider> Wakeups for SimCloud<P> {
    /// Keeps the token, and schedules the event AWS will send for what it awaits: at the time
    /// this cloud settles it, plus EventBridge's delivery (`events.delivery`) — or never, for
    /// the share of events lost.
    fn register<'a>(
        &'a self,
        token: &'a str,
        awaited: &'a crate::model::build::Awaited,
    ) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.kept.register(token, awaited).await?;
            if let Some((t, state)) = self.settles(awaited) {
                let lost = lock(&self.rng).unit() < self.lost_events;
                if lost {
                    lock(&self.events).1 += 1;
                } else {
                    let already = lock(&self.deliveries)
                        .iter()
                        .any(|(_, a)| a.id == awaited.id && a.state == state);
                    if !already {
                        let when = at(t.max(self.now()), self.draw("events.delivery", 0.0, 1.0));
                        let a = crate::stages::wake::Announced {
                            region: awaited.region.clone(),
                            id: awaited.id.clone(),
                            state,
                        };
                        lock(&self.deliveries).push((when, a));
                        self.delivery_added.notify_one();
                    }
                }
            }
            Ok(())
        })
    }

    fn registered<'a>(
        &'a self,
        region: &'a str,
        id: &'a str,
    ) -> PortResult<'a, Vec<(String, crate::model::build::Awaited)>> {
        self.kept.registered(region, id)
    }

    fn wake<'a>(
        &'a self,
        token: &'a str,
        awaited: &'a crate::model::build::Awaited,
        output: &'a serde_json::Value,
    ) -> PortResult<'a, bool> {
        self.kept.wake(token, awaited, output)
    }
}

impl<P: PortsProvider> PortsProvider for SimCloud<P> {
    fn ports(&self) -> Ports<'_> {
        let inner = self.inner.ports();
        Ports {
            compute: self,
            commands: self,
            store: inner.store,
            events: inner.events,
            parameters: inner.parameters,
            triggers: inner.triggers,
            wakeups: self,
            clock: self,
        }
    }
}

/// Step Functions and Lambda around the stage tasks: each invocation's overhead (and the first
/// one's cold start per function) in virtual time, and the billed duration of each.
pub struct SimTasks<T> {
    inner: T,
    table: Table,
    clock: Arc<TokioClock>,
    rng: Mutex<Rng>,
    /// Billed seconds of each invocation, by function.
    pub billed: Mutex<BTreeMap<String, Vec<f64>>>,
}

impl<T> std::fmt::Debug for SimTasks<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTasks").finish_non_exhaustive()
    }
}

impl<T> SimTasks<T> {
    pub fn new(inner: T, table: Table, clock: Arc<TokioClock>, seed: u64) -> Self {
        SimTasks {
            inner,
            table,
            clock,
            rng: Mutex::new(Rng::seeded(seed.wrapping_add(1))),
            billed: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<T: crate::engine::Tasks> crate::engine::Tasks for SimTasks<T> {
    fn invoke<'a>(
        &'a self,
        resource: &'a str,
        state: &'a str,
        input: serde_json::Value,
    ) -> futures::future::BoxFuture<'a, Result<serde_json::Value, crate::engine::StateError>> {
        Box::pin(async move {
            let name = crate::engine::LambdaCall::function_of(resource, &input);
            let function = match crate::stages::handler::Function::of_resource(name) {
                Some(f) => f.name().to_string(),
                None => resource.to_string(),
            };
            let cold = !lock(&self.billed).contains_key(&function);
            let (overhead, init) = {
                let mut rng = lock(&self.rng);
                let o = self.table.draw("lambda.invoke", &mut rng, 0.0, 1.0);
                let i = cold.then(|| self.table.draw("lambda.cold-start", &mut rng, 0.0, 1.0));
                (o, i.unwrap_or_default())
            };
            lock(&self.billed).entry(function.clone()).or_default();
            tokio::time::sleep(overhead + init).await;
            let start = EngineClock::now(self.clock.as_ref());
            let out = self.inner.invoke(resource, state, input).await;
            let spent = (EngineClock::now(self.clock.as_ref()) - start).num_milliseconds() as f64
                / 1000.0
                + init.as_secs_f64();
            lock(&self.billed).entry(function).or_default().push(spent);
            out
        })
    }
}

/// The p-th percentile (0..=100) of `values`, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_table_has_every_operation_with_a_source() {
        let t = Table::builtin();
        for op in OPERATIONS {
            assert!(!t.row(op).source.is_empty(), "{op}");
        }
        let broken = LATENCIES.replace("\"lambda.cold-start\"", "\"lambda.warm\"");
        let e = Table::parse(&broken).unwrap_err();
        assert!(e.contains("no row `lambda.cold-start`"), "{e}");
    }

    #[test]
    fn draws_follow_the_rows_quantiles() {
        let t = Table::builtin();
        let mut rng = Rng::seeded(7);
        let draws: Vec<f64> = (0..4000)
            .map(|_| {
                t.draw("ec2.instance.running", &mut rng, 0.0, 1.0)
                    .as_secs_f64()
            })
            .collect();
        let row = t.row("ec2.instance.running");
        let (p50, p90) = (percentile(&draws, 50.0), percentile(&draws, 90.0));
        assert!((p50 / row.p50 - 1.0).abs() < 0.05, "p50 {p50}");
        assert!((p90 / row.p90 - 1.0).abs() < 0.08, "p90 {p90}");
        // Size-scaled rows add their per-GiB seconds.
        let mut a = Rng::seeded(1);
        let mut b = Rng::seeded(1);
        let small = t.draw("ec2.image.available", &mut a, 8.0, 1.0);
        let big = t.draw("ec2.image.available", &mut b, 64.0, 1.0);
        assert!(big > small * 3, "{small:?} {big:?}");
    }

    #[test]
    fn continents() {
        assert!(!continents_differ("us-east-1", "us-west-2"));
        assert!(!continents_differ("us-east-1", "ca-central-1"));
        assert!(continents_differ("us-east-1", "eu-central-1"));
        assert!(continents_differ("eu-west-1", "ap-southeast-2"));
    }
}
