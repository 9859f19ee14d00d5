//! The embedded cloud: every port on one Linux machine, under `$KILN_HOME`.
//!
//! - `regions/<region>/`: an OCI image layout per region (images), `parameters.json`,
//!   `launch-templates.json`;
//! - `instances/<id>/`: one sandbox per instance (overlay upper dir, command folders, console);
//! - `layers/sha256/<hex>/`: image layers unpacked once, shared by every instance as overlay
//!   lower dirs;
//! - `agent/`: kiln-agent with the loader and C library it was linked against, bind-mounted
//!   read-only into every sandbox;
//! - `state.db`: the store (SQLite); `events.jsonl`: the events.

pub mod base;
pub mod beneath;
mod commands;
mod compute;
pub mod layer;
pub mod oci;
pub mod store;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::errors::{ErrorKind, StageError};
use crate::ports::{BuildEvent, Clock, Events, Parameters, PortResult, Ports, PortsProvider};

pub use compute::{limits_supported, network_supported, InstanceRecord, Job, USER_NET_PROGRAM};
pub use store::{ScheduleRow, SqliteStore};

/// Something told about every event as it happens (the progress display).
pub type Observer = Box<dyn Fn(&BuildEvent) + Send + Sync>;

/// The embedded cloud rooted at a kiln home.
pub struct LocalCloud {
    pub home: PathBuf,
    /// The host's kiln-agent: the sandbox keeper, and (copied) the agent inside sandboxes.
    pub agent: PathBuf,
    pub store: SqliteStore,
    observer: Mutex<Option<Observer>>,
    jobs: Arc<Mutex<BTreeMap<String, Job>>>,
    commands: Arc<Mutex<BTreeMap<String, commands::Running>>>,
    files: Mutex<()>,
    /// The agent folder, once prepared by this process.
    agent_dir: std::sync::OnceLock<PathBuf>,
    /// The task tokens waiting for a local state change (see `stages::wake`).
    pub wakeups: crate::stages::wake::KeptTokens,
}

impl std::fmt::Debug for LocalCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCloud")
            .field("home", &self.home)
            .finish()
    }
}

pub(crate) fn io_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> StageError {
    StageError::new(ErrorKind::Internal, format!("{what}: {e}"))
}

pub(crate) fn ready<'a, T: Send + 'a>(v: Result<T, StageError>) -> PortResult<'a, T> {
    Box::pin(async move { v })
}

/// The folders kiln keeps in a home; each private to its user (0700), as the home is.
const HOME_FOLDERS: [&str; 8] = [
    "regions",
    "instances",
    "layers",
    "layers/sha256",
    "layers/tmp",
    "tokens",
    "runs",
    "scratch",
];

/// The error code of a home kiln refuses to use (the CLI exits 2 on it).
pub const UNSAFE_HOME: &str = "UnsafeHome";

fn unsafe_home(message: String) -> StageError {
    StageError::new(ErrorKind::InvalidPipeline, message).with_code(UNSAFE_HOME)
}

/// Makes `home` private to the user kiln runs as, in the spirit of ssh's StrictModes: a new
/// home is made 0700; an existing one of this user that others can reach is tightened to 0700;
/// one owned by another user is refused (it could hold that user's pipelines, `privileged: true`
/// ones included, for this user to run). Layers hold setuid files and instances' upper dirs hold
/// whatever a component made: nobody but this user may reach them (podman's storage is 0700).
pub fn private_home(home: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let me = nix::unistd::geteuid().as_raw();
    let meta = match fs::metadata(home) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(home)
                .map_err(|e| io_error(format!("create the kiln home {}", home.display()), e))?;
            fs::metadata(home).map_err(|e| io_error(home.display(), e))?
        }
        Err(e) => return Err(io_error(format!("the kiln home {}", home.display()), e)),
    };
    let shown = home.display();
    if !meta.is_dir() {
        return Err(unsafe_home(format!(
            "the kiln home {shown} is not a folder; name another with --home or KILN_HOME"
        )));
    }
    let loose = meta.mode() & 0o077 != 0;
    if meta.uid() != me {
        let chmod = if loose {
            format!(" && chmod 700 {shown}")
        } else {
            String::new()
        };
        return Err(unsafe_home(format!(
            "the kiln home {shown} belongs to uid {}, not to uid {me} that runs kiln: its pipelines \
             and images are that user's to change, so kiln refuses to run them; use a home of your \
             own (--home or KILN_HOME), or take this one over with `chown -R {me} {shown}{chmod}`",
            meta.uid()
        )));
    }
    if loose {
        fs::set_permissions(home, fs::Permissions::from_mode(0o700)).map_err(|e| {
            unsafe_home(format!(
                "the kiln home {shown} is open to other users (mode {:o}) and could not be \
                 tightened ({e}): run `chmod 700 {shown}`",
                meta.mode() & 0o7777
            ))
        })?;
    }
    Ok(())
}

/// Creates (0700) or tightens to 0700 one of kiln's own folders in the home.
fn private_folder(dir: &Path) -> Result<(), StageError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_error(format!("create {}", dir.display()), e))?;
    let meta = fs::metadata(dir).map_err(|e| io_error(dir.display(), e))?;
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error(format!("make {} private", dir.display()), e))?;
    }
    Ok(())
}

/// `$KILN_HOME`, or `./.kiln`.
pub fn default_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".kiln"))
}

impl LocalCloud {
    /// Waits (at most `limit`) until no image is being written; whether none is. An image
    /// deregistered while pending is discarded by its writer, so after an interrupted build this
    /// is what leaves nothing half-written behind.
    pub fn wait_for_jobs(&self, limit: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            let pending = self
                .jobs
                .lock()
                .map(|j| {
                    j.values()
                        .any(|j| j.state == crate::ports::ImageState::Pending)
                })
                .unwrap_or(false);
            if !pending {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Opens (creating) the kiln home at `home`, using the kiln-agent binary at `agent`. The home
    /// is made private first (see [`private_home`]): one that is not is refused.
    pub fn open(home: &Path, agent: &Path) -> Result<LocalCloud, StageError> {
        private_home(home)?;
        for sub in HOME_FOLDERS {
            private_folder(&home.join(sub))?;
        }
        let home = fs::canonicalize(home).map_err(|e| io_error(home.display(), e))?;
        let store = SqliteStore::open(&home.join("state.db"))?;
        let cloud = LocalCloud {
            agent: agent.to_path_buf(),
            store,
            observer: Mutex::new(None),
            jobs: Arc::default(),
            commands: Arc::default(),
            files: Mutex::new(()),
            agent_dir: std::sync::OnceLock::new(),
            wakeups: Default::default(),
            home,
        };
        Ok(cloud)
    }

    /// Calls `observer` with every event from now on.
    pub fn observe(&self, observer: Observer) {
        *self
            .observer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(observer);
    }

    pub fn region_dir(&self, region: &str) -> PathBuf {
        self.home.join("regions").join(region)
    }

    pub fn layout(&self, region: &str) -> Result<oci::Layout, StageError> {
        oci::Layout::open(&self.region_dir(region).join("images"))
            .map_err(|e| io_error(format!("open the image store of {region}"), e))
    }

    /// Regions that have an image store.
    pub fn regions(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.home.join("regions"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn lock_files(&self) -> std::sync::MutexGuard<'_, ()> {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn parameters_file(&self, region: &str) -> PathBuf {
        self.region_dir(region).join("parameters.json")
    }

    /// All parameters of a region.
    pub fn parameters(&self, region: &str) -> BTreeMap<String, String> {
        fs::read(self.parameters_file(region))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Copies kiln-agent, its loader and its libraries into `agent/` (when changed), so that it
    /// runs in any image, whatever C library the image has. Checked once per process.
    pub fn prepare_agent(&self) -> Result<PathBuf, StageError> {
        if let Some(dir) = self.agent_dir.get() {
            return Ok(dir.clone());
        }
        let dir = self.install_agent()?;
        Ok(self.agent_dir.get_or_init(|| dir).clone())
    }

    fn install_agent(&self) -> Result<PathBuf, StageError> {
        let dir = self.home.join("agent");
        let meta = fs::metadata(&self.agent).map_err(|e| {
            io_error(
                format!(
                    "kiln-agent at {} (build it with `cargo build -p kiln-agent` or set KILN_AGENT)",
                    self.agent.display()
                ),
                e,
            )
        })?;
        let stamp = format!(
            "{} {} {:?}",
            self.agent.display(),
            meta.len(),
            meta.modified().ok()
        );
        if fs::read_to_string(dir.join("stamp")).ok().as_deref() == Some(stamp.as_str()) {
            return Ok(dir);
        }
        let _guard = self.lock_files();
        let tmp = self
            .home
            .join(format!("agent.tmp-{}", uuid::Uuid::new_v4().simple()));
        let result = (|| -> Result<(), StageError> {
            fs::create_dir_all(tmp.join("lib")).map_err(|e| io_error("create agent dir", e))?;
            fs::create_dir_all(tmp.join("cmd")).map_err(|e| io_error("create agent dir", e))?;
            fs::copy(&self.agent, tmp.join("kiln-agent"))
                .map_err(|e| io_error("copy kiln-agent", e))?;
            let (loader, libs) = base::shared_libraries(&self.agent)?;
            fs::copy(&loader, tmp.join("ld.so"))
                .map_err(|e| io_error(format!("copy {}", loader.display()), e))?;
            for lib in libs {
                let name = lib.file_name().unwrap_or_default();
                fs::copy(&lib, tmp.join("lib").join(name))
                    .map_err(|e| io_error(format!("copy {}", lib.display()), e))?;
            }
            fs::write(tmp.join("stamp"), &stamp).map_err(|e| io_error("write stamp", e))?;
            let _ = layer::remove_any(&dir);
            fs::rename(&tmp, &dir).map_err(|e| io_error("install agent dir", e))
        })();
        if result.is_err() {
            let _ = layer::remove_any(&tmp);
        }
        result.map(|_| dir)
    }
}

impl LocalCloud {
    /// Every instance this home has seen, oldest first.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.host().all()
    }

    pub fn terminate_instance(&self, id: &str) -> Result<(), StageError> {
        self.host().terminate(id)
    }

    /// Records that this process runs the execution `request` (see `run_owner_alive`).
    pub fn claim_run(&self, request: &str) -> Result<PathBuf, StageError> {
        let dir = self.home.join("runs");
        private_folder(&dir)?;
        let path = dir.join(request);
        fs::write(&path, std::process::id().to_string()).map_err(|e| io_error("claim run", e))?;
        Ok(path)
    }

    /// Whether the process that started execution `request` is still alive.
    pub fn run_owner_alive(&self, request: &str) -> bool {
        fs::read_to_string(self.home.join("runs").join(request))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    /// Unpacked layers (`layers/sha256/<digest>`) that no image in any region and no instance
    /// that is not terminated uses, with their sizes.
    pub fn unused_layer_dirs(&self) -> Result<Vec<(PathBuf, u64)>, StageError> {
        let mut used = std::collections::BTreeSet::new();
        for region in self.regions() {
            let layout = self.layout(&region)?;
            for image in layout.images().map_err(|e| io_error("images", e))? {
                for l in layout
                    .layers(&image.manifest)
                    .map_err(|e| io_error("layers", e))?
                {
                    used.insert(l.digest.trim_start_matches("sha256:").to_string());
                }
            }
        }
        for r in self.instances() {
            if r.state != crate::ports::InstanceState::Terminated {
                for l in &r.lower {
                    used.insert(
                        l.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        Ok(fs::read_dir(self.home.join("layers/sha256"))
            .map_err(|e| io_error("layers", e))?
            .flatten()
            .filter(|e| !used.contains(e.file_name().to_string_lossy().as_ref()))
            .map(|e| (e.path(), layer::size_of(&e.path())))
            .collect())
    }

    /// Deletes what nothing refers to (or, with `dry_run`, only lists it): blobs and temporary
    /// files in every region, unpacked layers no image or instance uses, scratch space.
    pub fn sweep(&self, dry_run: bool) -> Result<Swept, StageError> {
        let mut swept = Swept::default();
        for region in self.regions() {
            let layout = self.layout(&region)?;
            for (path, bytes) in layout
                .unreferenced()
                .map_err(|e| io_error(format!("sweep {region}"), e))?
            {
                swept.add(path, bytes);
            }
        }
        for (path, bytes) in self.unused_layer_dirs()? {
            swept.layer_dirs += 1;
            swept.add(path, bytes);
        }
        for dir in ["layers/tmp", "scratch"] {
            for e in fs::read_dir(self.home.join(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                swept.add(e.path(), layer::size_of(&e.path()));
            }
        }
        for e in fs::read_dir(&self.home)
            .map_err(|e| io_error("home", e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("agent.tmp-") {
                swept.add(e.path(), layer::size_of(&e.path()));
            }
        }
        if !dry_run {
            for (path, _) in &swept.paths {
                layer::remove_any(path).map_err(|e| io_error("remove leftovers", e))?;
            }
        }
        Ok(swept)
    }
}

impl Clock for LocalCloud {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }
}

impl Events for LocalCloud {
    fn emit<'a>(&'a self, event: &'a BuildEvent) -> PortResult<'a, ()> {
        let line = serde_json::json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "source": "kiln",
            "detail-type": "Kiln Image State Change",
            "detail": event,
        });
        let result = std::os::unix::fs::OpenOptionsExt::mode(
            OpenOptions::new().create(true).append(true),
            0o600,
        )
        .open(self.home.join("events.jsonl"))
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| io_error("write events.jsonl", e));
        if let Some(observer) = self
            .observer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            observer(event);
        }
        ready(result)
    }
}

impl Parameters for LocalCloud {
    fn get<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<String>> {
        ready(Ok(self.parameters(region).get(name).cloned()))
    }

    fn put<'a>(&'a self, region: &'a str, name: &'a str, value: &'a str) -> PortResult<'a, ()> {
        let _guard = self.lock_files();
        let mut all = self.parameters(region);
        all.insert(name.to_string(), value.to_string());
        let result = fs::create_dir_all(self.region_dir(region))
            .and_then(|_| {
                oci::write_atomic(
                    &self.parameters_file(region),
                    serde_json::to_vec_pretty(&all)
                        .unwrap_or_default()
                        .as_slice(),
                )
            })
            .map_err(|e| io_error(format!("write parameters of {region}"), e));
        ready(result)
    }
}

impl PortsProvider for LocalCloud {
    fn ports(&self) -> Ports<'_> {
        Ports {
            compute: self,
            commands: self,
            store: &self.store,
            events: self,
            parameters: self,
            triggers: &self.store,
            wakeups: &self.wakeups,
            clock: self,
        }
    }
}

/// What [`LocalCloud::sweep`] removed (or, in a dry run, would remove).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Each path with its bytes.
    pub paths: Vec<(PathBuf, u64)>,
    pub bytes: u64,
    /// Unpacked layers among `paths`.
    pub layer_dirs: usize,
}

impl Swept {
    fn add(&mut self, path: PathBuf, bytes: u64) {
        self.bytes += bytes;
        self.paths.push((path, bytes));
    }
}
