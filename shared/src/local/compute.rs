//! Embedded instances (sandboxes kept by `kiln-agent sandbox boot`) and images (OCI layouts).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::layer::{self, Whiteouts};
use super::oci::{self, ImageRecord, Layout};
use super::{io_error, ready, LocalCloud};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{BuildId, ImageId, InstanceId};
use crate::model::pipeline::{glob_match, LaunchPermission, Limits, Network, ParentFilter};
use crate::ports::{
    Compute, CopySpec, ImageFacts, ImageState, InstanceState, LaunchSpec, PortResult,
};

/// `instances/<id>/instance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    pub id: String,
    pub region: String,
    pub image: String,
    pub instance_type: String,
    pub tags: BTreeMap<String, String>,
    pub state: InstanceState,
    #[serde(deserialize_with = "network_of_record")]
    pub network: Network,
    pub launched: String,
    /// Image layers, topmost first (overlay lower dirs).
    pub lower: Vec<PathBuf>,
    #[serde(default)]
    pub keeper_pid: Option<u32>,
    /// Runs without the sandbox posture (`infrastructure.privileged`).
    #[serde(default)]
    pub privileged: bool,
    /// Destinations a private network lets through its default-deny (`network.allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// `infrastructure.limits`.
    #[serde(default)]
    pub limits: Limits,
}

/// An instance's network as its record says it: a name, or (records of kiln before `private`)
/// `true` for the host's and `false` for none.
fn network_of_record<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Recorded {
        Shared(bool),
        Named(Network),
    }
    Ok(match Recorded::deserialize(d)? {
        Recorded::Shared(true) => Network::Host,
        Recorded::Shared(false) => Network::None,
        Recorded::Named(n) => n,
    })
}

/// An image being written (snapshot or copy), or one that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub region: String,
    pub name: String,
    pub build: Option<String>,
    pub state: ImageState,
    /// Deleted while pending: the writer drops its result.
    pub deleted: bool,
    /// Bytes written and seconds spent, once done.
    pub bytes: u64,
    pub seconds: f64,
}

fn not_found(kind: &str, id: &str, code: &str) -> StageError {
    StageError::new(ErrorKind::Retryable, format!("no {kind} {id}")).with_code(code)
}

/// An id shaped like EC2's: `ami-`/`i-` and 17 hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &hex[..17])
}

pub(crate) fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// This machine's architecture as EC2 names it.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    }
}

/// The program that gives `network: private` instances their outbound access.
pub const USER_NET_PROGRAM: &str = "slirp4netns";

/// Whether this machine can give an instance `network`: a clear reason when it cannot.
pub fn network_supported(network: Network) -> Result<(), String> {
    if network != Network::Private {
        return Ok(());
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(USER_NET_PROGRAM).is_file()))
        .unwrap_or(false);
    if !found {
        return Err(format!(
            "infrastructure.network: private (the default) needs {USER_NET_PROGRAM} on PATH (Debian package {USER_NET_PROGRAM}, installed by `make setup`); or choose `network: none` (loopback only) or `network: host` (the machine's interfaces)"
        ));
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Err(format!(
            "infrastructure.network: private (the default) needs /dev/net/tun, which this user cannot open ({e}); a stock Debian has it mode 0666 (`chmod 0666 /dev/net/tun` as root); or choose `network: none` or `network: host`"
        ));
    }
    // Without nft the default-deny cannot be installed: refused, never run unfiltered.
    if crate::confine::find_program(crate::confine::NFT).is_none() {
        return Err(format!(
            "infrastructure.network: private (the default) needs {nft} (Debian package nftables, installed by `make setup`) to refuse link-local, private and the host's own addresses; or choose `network: none` (loopback only) or `network: host` (the machine's interfaces)",
            nft = crate::confine::NFT
        ));
    }
    Ok(())
}

/// Whether this machine can bound an instance as `limits` asks: a clear reason when it cannot.
pub fn limits_supported(limits: Limits) -> Result<(), String> {
    match limits {
        Limits::None => Ok(()),
        Limits::Bounded { .. } => crate::confine::cgroups_available(),
    }
}

/// The host side of sandboxes; cheap to clone into the threads that wait on them.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub home: PathBuf,
    pub agent: PathBuf,
}

/// Whether `pid` is a live process started from kiln-agent's sandbox commands.
fn is_sandbox_process(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let text = String::from_utf8_lossy(&c);
            text.contains("kiln-agent") && text.contains("sandbox")
        })
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `lines` lines of a file.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    super::beneath::tail_of(path, lines)
}

impl Host {
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.home.join("instances").join(id)
    }

    pub fn record(&self, id: &str) -> Result<InstanceRecord, StageError> {
        let bytes = fs::read(self.instance_dir(id).join("instance.json"))
            .map_err(|_| not_found("instance", id, "InvalidInstanceID.NotFound"))?;
        serde_json::from_slice(&bytes).map_err(|e| io_error(format!("instance {id}"), e))
    }

    pub fn save(&self, r: &InstanceRecord) -> Result<(), StageError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| io_error("instance", e))?;
        oci::write_atomic(&self.instance_dir(&r.id).join("instance.json"), &bytes)
            .map_err(|e| io_error(format!("save instance {}", r.id), e))
    }

    /// Starts the instance's keeper (namespaces, overlay, init).
    pub fn boot(&self, r: &mut InstanceRecord, agent_dir: &Path) -> Result<(), StageError> {
        let dir = self.instance_dir(&r.id);
        for f in ["init.pid", "keeper.exit", "console.log"] {
            let _ = fs::remove_file(dir.join(f));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("keeper.log"))
            .map_err(|e| io_error("open keeper.log", e))?;
        let lower: Vec<String> = r.lower.iter().map(|p| p.display().to_string()).collect();
        let mut c = Command::new(&self.agent);
        c.args(["sandbox", "boot", "--instance-dir"])
            .arg(&dir)
            .arg("--lower")
            .arg(lower.join(":"))
            .arg("--hostname")
            .arg(&r.id)
            .arg("--agent-dir")
            .arg(agent_dir);
        c.arg("--network").arg(r.network.as_str());
        for a in &r.allow {
            c.arg("--allow").arg(a);
        }
        match r.limits {
            Limits::None => c.arg("--no-limits"),
            Limits::Bounded { pids, memory } => c
                .arg("--pids-max")
                .arg(pids.to_string())
                .arg("--memory-max")
                .arg(memory.to_string()),
        };
        if r.privileged {
            c.arg("--privileged");
        }
        // Its own process group: a Ctrl-C at the terminal reaches kiln, which cleans up.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| io_error("keeper.log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| io_error(format!("start {}", self.agent.display()), e))?;
        r.keeper_pid = Some(child.id());
        self.save(r)?;
        let exit = dir.join("keeper.exit");
        std::thread::spawn(move || {
            let code = child.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1);
            let _ = fs::write(exit, code.to_string());
        });
        Ok(())
    }

    /// Up: init runs and mounted /proc. An error when the keeper ended before that.
    pub fn is_ready(&self, id: &str) -> Result<bool, StageError> {
        let dir = self.instance_dir(id);
        let console = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if console.contains(kiln_ready_line()) {
            if let Some(pid) = read_pid(&dir.join("init.pid")) {
                if is_sandbox_process(pid) {
                    return Ok(true);
                }
            }
        }
        if dir.join("keeper.exit").exists() {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!(
                    "instance {id} did not start: {}",
                    tail(&dir.join("keeper.log"), 5)
                ),
            ));
        }
        Ok(false)
    }

    pub fn wait_ready(&self, id: &str, limit: Duration) -> Result<(), StageError> {
        let start = Instant::now();
        while !self.is_ready(id)? {
            if start.elapsed() > limit {
                return Err(StageError::new(
                    ErrorKind::Timeout,
                    format!("instance {id} did not start within {limit:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// The cgroup folders the instance's keeper put it in (none when it used rlimits).
    pub fn cgroups(&self, id: &str) -> Vec<PathBuf> {
        fs::read_to_string(self.instance_dir(id).join("cgroups"))
            .unwrap_or_default()
            .lines()
            .map(PathBuf::from)
            .collect()
    }

    /// The host PID of the instance's init, when it runs.
    pub fn init_pid(&self, id: &str) -> Option<u32> {
        read_pid(&self.instance_dir(id).join("init.pid")).filter(|p| is_sandbox_process(*p))
    }

    /// Kills the instance's processes (all of them: init is PID 1 of their namespace) and
    /// waits for the keeper to end, which takes its mounts with it.
    pub fn halt(&self, r: &InstanceRecord) {
        let kill = |pid: u32| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        let exited = self.instance_dir(&r.id).join("keeper.exit");
        let start = Instant::now();
        loop {
            // init, also when it starts after the halt began (a keeper still setting up).
            if let Some(pid) = self.init_pid(&r.id) {
                kill(pid);
            }
            let Some(keeper) = r.keeper_pid.filter(|p| is_sandbox_process(*p)) else {
                break;
            };
            if exited.exists() || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                // A keeper whose init never started (or will not die): end it too.
                kill(keeper);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The keeper's cgroups, once the last process in them is gone.
        for d in self.cgroups(&r.id) {
            let start = Instant::now();
            while fs::remove_dir(&d).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            crate::confine::remove_parent_if_empty(&d);
        }
    }

    /// Halts the instance and removes its file system; the record stays, marked terminated.
    pub fn terminate(&self, id: &str) -> Result<(), StageError> {
        let mut r = match self.record(id) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        if r.state == InstanceState::Terminated {
            return Ok(());
        }
        self.halt(&r);
        let dir = self.instance_dir(id);
        for sub in ["upper", "work", "rootfs"] {
            layer::remove_any(&dir.join(sub))
                .map_err(|e| io_error(format!("remove {}/{sub}", dir.display()), e))?;
        }
        r.state = InstanceState::Terminated;
        self.save(&r)
    }

    pub fn all(&self) -> Vec<InstanceRecord> {
        let mut out: Vec<InstanceRecord> = fs::read_dir(self.home.join("instances"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| self.record(&e.file_name().to_string_lossy()).ok())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.launched.cmp(&b.launched));
        out
    }
}

fn kiln_ready_line() -> &'static str {
    "kiln-agent init: ready"
}

/// What a finished snapshot or copy reports.
struct Written {
    bytes: u64,
}

impl LocalCloud {
    pub(crate) fn host(&self) -> Host {
        Host {
            home: self.home.clone(),
            agent: self.agent.clone(),
        }
    }

    /// The overlay lower dir of a layer, unpacked once for every instance and region.
    fn unpacked(&self, layout: &Layout, d: &oci::Descriptor) -> Result<PathBuf, StageError> {
        let hex = d.digest.trim_start_matches("sha256:");
        let target = self.home.join("layers/sha256").join(hex);
        if target.exists() {
            return Ok(target);
        }
        let tmp = self
            .home
            .join("layers/tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let result = layer::unpack(&layout.blob_path(&d.digest), &tmp, Whiteouts::Overlay)
            .map_err(|e| io_error(format!("unpack layer {}", d.digest), e));
        if let Err(e) = result {
            let _ = layer::remove_any(&tmp);
            return Err(e);
        }
        if fs::rename(&tmp, &target).is_err() {
            // Another instance unpacked it first.
            let _ = layer::remove_any(&tmp);
        }
        Ok(target)
    }

    /// A token's earlier result (ClientToken idempotency).
    fn token(&self, token: &str) -> Option<String> {
        fs::read_to_string(self.token_path(token)).ok()
    }

    fn token_path(&self, token: &str) -> PathBuf {
        self.home
            .join("tokens")
            .join(hex::encode(Sha256::digest(token.as_bytes())))
    }

    fn remember_token(&self, token: &str, id: &str) -> Result<(), StageError> {
        fs::write(self.token_path(token), id).map_err(|e| io_error("record client token", e))
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Snapshot and copy jobs by image id (for the summary and the benchmarks).
    pub fn job(&self, image: &str) -> Option<Job> {
        self.jobs().get(image).cloned()
    }

    fn image_record(&self, region: &str, id: &str) -> Result<ImageRecord, StageError> {
        self.layout(region)?
            .image(id)
            .map_err(|e| io_error(format!("read the images of {region}"), e))?
            .ok_or_else(|| not_found("image", id, "InvalidAMIID.NotFound"))
    }

    /// Runs `work` in a thread as the writer of image `id`: Pending until done.
    fn start_job(
        &self,
        id: &str,
        region: &str,
        name: &str,
        tags: &BTreeMap<String, String>,
        work: impl FnOnce() -> Result<(Written, ImageRecord), String> + Send + 'static,
        layout: Layout,
    ) {
        self.jobs().insert(
            id.to_string(),
            Job {
                region: region.into(),
                name: name.into(),
                build: tags.get("kiln:build-id").cloned(),
                state: ImageState::Pending,
                deleted: false,
                bytes: 0,
                seconds: 0.0,
            },
        );
        let jobs = self.jobs.clone();
        let id = id.to_string();
        std::thread::spawn(move || {
            let start = Instant::now();
            let result = work().and_then(|(w, record)| {
                let deleted = jobs
                    .lock()
                    .map(|j| j.get(&id).is_some_and(|j| j.deleted))
                    .unwrap_or(false);
                if !deleted {
                    layout.add(record).map_err(|e| e.to_string())?;
                }
                Ok((w, !deleted))
            });
            // Failed, or deregistered while it was written: nothing of it stays.
            if !matches!(result, Ok((_, true))) {
                let _ = layout.take_back();
            }
            let result = result.map(|(w, _)| w);
            if let Ok(mut jobs) = jobs.lock() {
                if let Some(job) = jobs.get_mut(&id) {
                    job.seconds = start.elapsed().as_secs_f64();
                    match result {
                        Ok(w) => {
                            job.bytes = w.bytes;
                            job.state = ImageState::Available;
                        }
                        Err(e) => job.state = ImageState::Failed(e),
                    }
                }
            }
        });
    }
}

/// Writes the image of an instance's upper dir: the parent's layers plus one new layer.
fn snapshot(
    layout: &Layout,
    parent: &ImageRecord,
    upper: &Path,
    exclude: &BTreeSet<String>,
    id: &str,
    name: &str,
    tags: &BTreeMap<String, String>,
) -> Result<(Written, ImageRecord), String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let (layer, new) = layout
        .put_layer(upper, true, exclude)
        .map_err(|e| fail("write the layer", &e))?;
    let created = now_text();
    let manifest = layout
        .put_image(
            Some(&parent.manifest),
            &layer,
            &new.diff_id,
            &format!("kiln snapshot {name}"),
            &created,
        )
        .map_err(|e| fail("write the image", &e))?;
    Ok((
        Written { bytes: new.size },
        ImageRecord {
            id: id.into(),
            name: name.into(),
            created,
            tags: tags.clone(),
            launch_permissions: Vec::new(),
            build_id: tags.get("kiln:build-id").cloned(),
            deprecated: None,
            manifest,
        },
    ))
}

/// Paths inside an upper dir that only exist for the sandbox (mount points it created).
fn scaffolding(instance_dir: &Path) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = fs::read_to_string(instance_dir.join("scaffold"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    out.insert(".kiln".into());
    out
}

impl Compute for LocalCloud {
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> PortResult<'a, InstanceId> {
        ready((|| {
            if let Some(id) = self.token(&spec.client_token) {
                return Ok(InstanceId(id));
            }
            network_supported(spec.infrastructure.network.mode)
                .and_then(|()| limits_supported(spec.infrastructure.limits))
                .map_err(|e| StageError::new(ErrorKind::InvalidPipeline, e))?;
            let layout = self.layout(&spec.region)?;
            let image = layout
                .image(spec.image.as_str())
                .map_err(|e| io_error("read images", e))?
                .ok_or_else(|| {
                    StageError::new(
                        ErrorKind::InvalidPipeline,
                        format!("image {} is not available in {}", spec.image, spec.region),
                    )
                    .with_code("InvalidAMIID.NotFound")
                })?;
            let mut lower = Vec::new();
            for d in layout
                .layers(&image.manifest)
                .map_err(|e| io_error("read layers", e))?
            {
                lower.push(self.unpacked(&layout, &d)?);
            }
            lower.reverse();
            let agent_dir = self.prepare_agent()?;
            let host = self.host();
            let id = new_id("i");
            let dir = host.instance_dir(&id);
            for sub in ["upper", "work", "rootfs", "cmd"] {
                fs::create_dir_all(dir.join(sub)).map_err(|e| io_error("create instance", e))?;
            }
            self.remember_token(&spec.client_token, &id)?;
            let mut r = InstanceRecord {
                id: id.clone(),
                region: spec.region.clone(),
                image: image.id.clone(),
                instance_type: spec.instance_type.clone(),
                tags: spec.tags.clone(),
                state: InstanceState::Pending,
                network: spec.infrastructure.network.mode,
                privileged: spec.infrastructure.privileged,
                allow: spec.infrastructure.network.allow.clone(),
                limits: spec.infrastructure.limits,
                launched: now_text(),
                lower,
                keeper_pid: None,
            };
            host.save(&r)?;
            host.boot(&mut r, &agent_dir)?;
            Ok(InstanceId(id))
        })())
    }

    fn instance_state<'a>(
        &'a self,
        _region: &'a str,
        id: &'a InstanceId,
    ) -> PortResult<'a, InstanceState> {
        ready((|| {
            let host = self.host();
            let mut r = host.record(id.as_str())?;
            if r.state == InstanceState::Pending && host.is_ready(id.as_str())? {
                r.state = InstanceState::Running;
                host.save(&r)?;
            }
            Ok(r.state)
        })())
    }

    fn stop<'a>(&'a self, _region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        ready((|| {
            let host = self.host();
            let mut r = host.record(id.as_str())?;
            if r.state == InstanceState::Terminated {
                return Err(
                    StageError::new(ErrorKind::Internal, format!("{id} is terminated"))
                        .with_code("IncorrectInstanceState"),
                );
            }
            host.halt(&r);
            r.state = InstanceState::Stopped;
            host.save(&r)
        })())
    }

    fn terminate<'a>(&'a self, _region: &'a str, id: &'a InstanceId) -> PortResult<'a, ()> {
        ready(self.host().terminate(id.as_str()))
    }

    fn instances_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<InstanceId>> {
        ready(Ok(self
            .host()
            .all()
            .into_iter()
            .filter(|r| {
                r.region == region
                    && r.state != InstanceState::Terminated
                    && r.tags.get("kiln:build-id") == Some(&build.0)
            })
            .map(|r| InstanceId(r.id))
            .collect()))
    }

    fn create_image<'a>(
        &'a self,
        region: &'a str,
        instance: &'a InstanceId,
        name: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> PortResult<'a, ImageId> {
        ready((|| {
            let host = self.host();
            let r = host.record(instance.as_str())?;
            if r.state != InstanceState::Stopped {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!("{instance} is not stopped"),
                )
                .with_code("IncorrectInstanceState"));
            }
            let layout = self.layout(region)?;
            self.check_name_free(&layout, region, name)?;
            let parent = self.image_record(&r.region, &r.image)?;
            let id = new_id("ami");
            let dir = host.instance_dir(instance.as_str());
            let exclude = scaffolding(&dir);
            let layout = layout.journaled();
            let (upper, job_layout) = (dir.join("upper"), layout.clone());
            let (id2, name2, tags2) = (id.clone(), name.to_string(), tags.clone());
            self.start_job(
                &id,
                region,
                name,
                tags,
                move || snapshot(&job_layout, &parent, &upper, &exclude, &id2, &name2, &tags2),
                layout,
            );
            Ok(ImageId(id))
        })())
    }

    fn describe_image<'a>(
        &'a self,
        region: &'a str,
        id: &'a ImageId,
    ) -> PortResult<'a, Option<ImageFacts>> {
        ready((|| {
            let layout = self.layout(region)?;
            if let Some(image) = layout
                .image(id.as_str())
                .map_err(|e| io_error("read images", e))?
            {
                return Ok(Some(ImageFacts {
                    state: ImageState::Available,
                    architecture: layout
                        .architecture(&image.manifest)
                        .map_err(|e| io_error(format!("read {id}"), e))?,
                    root_device: None,
                }));
            }
            Ok(self.jobs().get(id.as_str()).map(|j| ImageFacts {
                state: j.state.clone(),
                architecture: host_architecture().into(),
                root_device: None,
            }))
        })())
    }

    /// Every instance type runs on this machine, which has one architecture.
    fn instance_architectures<'a>(
        &'a self,
        _region: &'a str,
        types: &'a [String],
    ) -> PortResult<'a, BTreeMap<String, Vec<String>>> {
        ready(Ok(types
            .iter()
            .map(|t| (t.clone(), vec![host_architecture().to_string()]))
            .collect()))
    }

    fn image_state<'a>(&'a self, region: &'a str, id: &'a ImageId) -> PortResult<'a, ImageState> {
        ready((|| {
            if self
                .layout(region)?
                .image(id.as_str())
                .ok()
                .flatten()
                .is_some()
            {
                return Ok(ImageState::Available);
            }
            match self.jobs().get(id.as_str()) {
                Some(j) if j.state != ImageState::Available => Ok(j.state.clone()),
                _ => Err(not_found("image", id.as_str(), "InvalidAMIID.NotFound")),
            }
        })())
    }

    fn images_of<'a>(
        &'a self,
        region: &'a str,
        build: &'a BuildId,
    ) -> PortResult<'a, Vec<ImageId>> {
        ready((|| {
            let mut out: Vec<ImageId> = self
                .layout(region)?
                .images()
                .map_err(|e| io_error("read images", e))?
                .into_iter()
                .filter(|i| i.build_id.as_deref() == Some(build.as_str()))
                .map(|i| ImageId(i.id))
                .collect();
            for (id, j) in self.jobs().iter() {
                if j.region == region
                    && j.build.as_deref() == Some(build.as_str())
                    && j.state == ImageState::Pending
                    && !j.deleted
                    && !out.iter().any(|o| o.as_str() == id)
                {
                    out.push(ImageId(id.clone()));
                }
            }
            Ok(out)
        })())
    }

    fn copy_image<'a>(
        &'a self,
        from_region: &'a str,
        image: &'a ImageId,
        to_region: &'a str,
        copy: CopySpec<'a>,
    ) -> PortResult<'a, ImageId> {
        // Embedded images are not encrypted: the key is not used.
        let CopySpec {
            name,
            client_token,
            tags,
            ..
        } = copy;
        ready((|| {
            if let Some(id) = self.token(client_token) {
                return Ok(ImageId(id));
            }
            let source = self.image_record(from_region, image.as_str())?;
            let from = self.layout(from_region)?;
            let to = self.layout(to_region)?.journaled();
            self.check_name_free(&to, to_region, name)?;
            let id = new_id("ami");
            self.remember_token(client_token, &id)?;
            let (from2, to2, id2, name2, tags2) =
                (from, to.clone(), id.clone(), name.to_string(), tags.clone());
            self.start_job(
                &id,
                to_region,
                name,
                tags,
                move || {
                    let mut bytes = 0;
                    let blobs = from2
                        .blobs_of(&source.manifest)
                        .map_err(|e| format!("read {}: {e}", source.id))?;
                    for d in &blobs {
                        bytes += to2
                            .copy_blob(&from2, d)
                            .map_err(|e| format!("copy {}: {e}", d.digest))?;
                    }
                    let mut manifest = source.manifest.clone();
                    manifest.annotations.clear();
                    Ok((
                        Written { bytes },
                        ImageRecord {
                            id: id2,
                            name: name2,
                            created: now_text(),
                            tags: tags2.clone(),
                            launch_permissions: Vec::new(),
                            build_id: tags2.get("kiln:build-id").cloned(),
                            deprecated: None,
                            manifest,
                        },
                    ))
                },
                to,
            );
            Ok(ImageId(id))
        })())
    }

    fn share_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        permission: &'a LaunchPermission,
    ) -> PortResult<'a, ()> {
        ready((|| {
            let found = self
                .layout(region)?
                .update(|images| {
                    let Some(i) = images.iter_mut().find(|i| i.id == image.as_str()) else {
                        return Ok(false);
                    };
                    if !i.launch_permissions.contains(permission) {
                        i.launch_permissions.push(permission.clone());
                    }
                    Ok(true)
                })
                .map_err(|e| io_error("share image", e))?;
            if found {
                Ok(())
            } else {
                Err(not_found("image", image.as_str(), "InvalidAMIID.NotFound"))
            }
        })())
    }

    fn delete_image<'a>(&'a self, region: &'a str, image: &'a ImageId) -> PortResult<'a, ()> {
        ready((|| {
            if let Some(j) = self.jobs().get_mut(image.as_str()) {
                j.deleted = true;
            }
            self.layout(region)?
                .remove(image.as_str())
                .map_err(|e| io_error(format!("delete {image}"), e))?;
            Ok(())
        })())
    }

    fn latest_image<'a>(
        &'a self,
        region: &'a str,
        filter: &'a ParentFilter,
    ) -> PortResult<'a, Option<ImageId>> {
        ready(self.newest(region, |i| glob_match(&filter.name, &i.name)))
    }

    fn image_named<'a>(
        &'a self,
        region: &'a str,
        name: &'a str,
    ) -> PortResult<'a, Option<ImageId>> {
        ready(self.newest(region, |i| i.name == name))
    }

    fn pipeline_images<'a>(
        &'a self,
        region: &'a str,
        pipeline: &'a str,
    ) -> PortResult<'a, Vec<crate::ports::ImageInfo>> {
        let time = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc))
        };
        ready((|| {
            Ok(self
                .layout(region)?
                .images()
                .map_err(|e| io_error("read images", e))?
                .into_iter()
                .filter(|i| i.tags.get("kiln:pipeline").map(String::as_str) == Some(pipeline))
                .filter_map(|i| {
                    Some(crate::ports::ImageInfo {
                        id: ImageId(i.id.clone()),
                        created: time(&i.created)?,
                        deprecated: i.deprecated.as_deref().and_then(time),
                        name: i.name,
                        tags: i.tags,
                    })
                })
                .collect())
        })())
    }

    fn deprecate_image<'a>(
        &'a self,
        region: &'a str,
        image: &'a ImageId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> PortResult<'a, ()> {
        ready((|| {
            let found = self
                .layout(region)?
                .update(|images| {
                    let Some(i) = images.iter_mut().find(|i| i.id == image.as_str()) else {
                        return Ok(false);
                    };
                    i.deprecated = Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    Ok(true)
                })
                .map_err(|e| io_error("deprecate image", e))?;
            if found {
                Ok(())
            } else {
                Err(not_found("image", image.as_str(), "InvalidAMIID.NotFound"))
            }
        })())
    }

    fn new_launch_template_version<'a>(
        &'a self,
        region: &'a str,
        template: &'a str,
        image: &'a ImageId,
        set_default: bool,
    ) -> PortResult<'a, ()> {
        ready((|| {
            let _guard = self.lock_files();
            let path = self.region_dir(region).join("launch-templates.json");
            let mut all: BTreeMap<String, serde_json::Value> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let t = all
                .entry(template.to_string())
                .or_insert_with(|| json!({"versions": [], "default": 1}));
            let versions = t["versions"].as_array().map(Vec::len).unwrap_or(0) + 1;
            if let Some(v) = t["versions"].as_array_mut() {
                v.push(json!({"version": versions, "imageId": image.as_str()}));
            }
            if set_default {
                t["default"] = json!(versions);
            }
            let mut f = fs::File::create(&path).map_err(|e| io_error("launch templates", e))?;
            f.write_all(&serde_json::to_vec_pretty(&all).unwrap_or_default())
                .map_err(|e| io_error("launch templates", e))
        })())
    }
}

impl LocalCloud {
    /// The most recently created image of `region` that `wanted` accepts.
    fn newest(
        &self,
        region: &str,
        wanted: impl Fn(&ImageRecord) -> bool,
    ) -> Result<Option<ImageId>, StageError> {
        Ok(self
            .layout(region)?
            .images()
            .map_err(|e| io_error("read images", e))?
            .into_iter()
            .filter(|i| wanted(i))
            .max_by(|a, b| a.created.cmp(&b.created))
            .map(|i| ImageId(i.id)))
    }

    fn check_name_free(&self, layout: &Layout, region: &str, name: &str) -> Result<(), StageError> {
        let taken = layout
            .images()
            .map_err(|e| io_error("read images", e))?
            .iter()
            .any(|i| i.name == name)
            || self.jobs().values().any(|j| {
                j.region == region && j.name == name && j.state == ImageState::Pending && !j.deleted
            });
        if taken {
            return Err(StageError::new(
                ErrorKind::Internal,
                format!("an image named {name} exists in {region}"),
            )
            .with_code("InvalidAMIName.Duplicate"));
        }
        Ok(())
    }
}
