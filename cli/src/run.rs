//! `kiln run PIPELINE.yaml`: the state machine (`infra/statemachine/pipeline.asl.json`) executed
//! by kiln's engine, its Task states calling the stage code in-process over the embedded cloud
//! (or, with `--backend aws`, over EC2, SSM and S3 with the build state kept locally).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::engine::clock::{Clock, RealClock};
use kiln::engine::{Engine, Outcome, Status};
use kiln::execution::{self, LongPoll, StageTaskAdapter, Timeline};
use kiln::local::LocalCloud;
use kiln::model::build::{Build, BuildStatus};
use kiln::model::pipeline::Parent;
use kiln::ports::{PipelineRecord, PortsProvider};
use kiln::stages::handler::{local_substitutions, DEFINITION};
use serde_json::{json, Value as Json};

use crate::{exit, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// Sandboxed instances and OCI image stores on this machine.
    #[default]
    Local,
    /// EC2, SSM and S3 in your AWS account (AWS_ENDPOINT_URL honoured); state stays local.
    Aws,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(value_name = "PIPELINE.yaml")]
    pub pipeline: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    pub backend: Backend,
    /// `--backend aws`: the bucket for the agent, documents, reports and logs (created when
    /// missing).
    #[arg(long, value_name = "BUCKET")]
    pub artifacts_bucket: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// End the build when it runs longer than this (`90s`, `30m`, `2h`; seconds without a unit):
    /// the execution's TimeoutSeconds, as a Step Functions execution has one. It ends TIMED_OUT,
    /// its instances terminated, the build FAILED with States.Timeout, the lock released.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// `--backend aws`: the instance profile of the builder and test instances when the pipeline's
    /// `infrastructure.instanceProfile` names none (name or ARN). kiln creates no IAM role.
    #[arg(long, value_name = "NAME|ARN", value_parser = parse_instance_profile)]
    pub instance_profile: Option<String>,
}

fn parse_instance_profile(text: &str) -> Result<String, String> {
    kiln::model::ids::shape::instance_profile(text).map(|()| text.to_string())
}

/// `--timeout`: a whole number with an optional unit `s`, `m` or `h`, at least one second.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "`{text}`: the unit must be s, m or h (as in 90s, 30m, 2h)"
            ))
        }
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 && n <= 365 * 24 * 3600 / scale => Ok(Duration::from_secs(n * scale)),
        _ => Err(format!(
            "`{text}`: a whole number of seconds, minutes or hours from 1s to 365 days (as in 90s, 30m, 2h)"
        )),
    }
}

/// How one execution runs and reports.
#[derive(Debug)]
pub struct How {
    pub backend: Backend,
    pub output: Output,
    /// The execution input's `trigger`.
    pub trigger: Json,
    /// Ctrl-C and SIGTERM, caught since before the build started.
    pub shutdown: Shutdown,
    /// The execution's TimeoutSeconds (`--timeout`); none by default.
    pub timeout: Option<Duration>,
}

/// Where the embedded cloud lives: `--home`, `$KILN_HOME`, or `./.kiln`.
pub fn home(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .unwrap_or_else(kiln::local::default_home)
}

/// The kiln-agent binary: `$KILN_AGENT`, or the one beside this program.
pub fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("kiln-agent")))
        .filter(|p| p.is_file());
    beside.ok_or_else(|| {
        "kiln-agent was not found beside kiln; build it (`cargo build -p kiln-agent`) or set KILN_AGENT"
            .to_string()
    })
}

/// An ordinary user's instances are user namespaces (the user is root inside, as with rootless
/// podman) with an overlay root mounted there: what the kernel must allow for that.
fn rootless_supported() -> Result<(), String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|t| t.trim().to_string())
    };
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Err("embedded instances as an ordinary user need user namespaces, and this kernel allows none (user.max_user_namespaces = 0): raise it (sysctl user.max_user_namespaces=15000) or run kiln as root".into());
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Err("embedded instances as an ordinary user need user namespaces, and this kernel refuses them to ordinary users (kernel.unprivileged_userns_clone = 0): set it to 1 or run kiln as root".into());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return Err("embedded instances as an ordinary user need user namespaces, and AppArmor restricts them (kernel.apparmor_restrict_unprivileged_userns = 1): allow them for kiln-agent or run kiln as root".into());
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 11) {
        return Err(format!("embedded instances as an ordinary user mount overlayfs in a user namespace, which needs Linux 5.11 or later (this is {release}): run kiln as root"));
    }
    Ok(())
}

/// Opens the embedded cloud, refusing clearly what this machine cannot do.
pub fn open_cloud(home: &Path) -> Result<LocalCloud, String> {
    if !nix::unistd::geteuid().is_root() {
        rootless_supported()?;
    }
    let agent = agent_binary()?;
    LocalCloud::open(home, &agent).map_err(|e| e.to_string())
}

/// Both halves of `--backend aws`: the remote compute, commands and parameters, and the local
/// store, events and clock.
#[cfg(feature = "aws")]
struct Mixed<R> {
    remote: R,
    local: LocalCloud,
}

/// Providers that keep their state in an embedded cloud.
pub trait HasLocal {
    fn local(&self) -> &LocalCloud;
    /// How often the event source reads what the waits await: the local cloud's state is a
    /// file or a process away; AWS's is an API call, throttled past a few per second.
    fn event_interval(&self) -> Duration {
        Duration::from_millis(10)
    }
}

impl HasLocal for LocalCloud {
    fn local(&self) -> &LocalCloud {
        self
    }
}

#[cfg(feature = "aws")]
impl<R> HasLocal for Mixed<R> {
    fn local(&self) -> &LocalCloud {
        &self.local
    }
    fn event_interval(&self) -> Duration {
        Duration::from_secs(2)
    }
}

#[cfg(feature = "aws")]
impl<R: PortsProvider> PortsProvider for Mixed<R> {
    fn ports(&self) -> kiln::ports::Ports<'_> {
        let r = self.remote.ports();
        kiln::ports::Ports {
            compute: r.compute,
            commands: r.commands,
            parameters: r.parameters,
            triggers: &self.local.store,
            store: &self.local.store,
            events: &self.local,
            wakeups: &self.local.wakeups,
            clock: &self.local,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn output_log(home: &Path, b: &Build) -> Option<PathBuf> {
    let (instance, command) = match b.status {
        BuildStatus::Testing => (b.test_instance.as_ref()?, b.test_command.as_ref()?),
        _ => (b.builder.as_ref()?, b.customize_command.as_ref()?),
    };
    Some(
        home.join("instances")
            .join(instance.id.as_str())
            .join("cmd")
            .join(command.as_str())
            .join("output.log"),
    )
}

/// The last line of a command's output, from the end of the file only (the instance writes it:
/// any size).
fn last_line(path: &Path) -> String {
    let end = std::fs::File::open(path)
        .and_then(|f| kiln::local::beneath::read_end(f, 4096))
        .unwrap_or_default();
    String::from_utf8_lossy(&end)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| crate::terminal_safe(l).into_owned())
        .unwrap_or_default()
}

/// Loads and checks a pipeline file; on problems, reports them all (as JSON with `json`) and
/// returns None: the caller exits 2.
pub fn load_or_report(
    file: &Path,
    json: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<Option<kiln::model::LoadedPipeline>> {
    match kiln::model::load(file) {
        Ok(l) => Ok(Some(l)),
        Err(d) => {
            let results = [kiln::report::Checked {
                file: file.to_path_buf(),
                outcome: Err(d),
            }];
            kiln::report::write(&results, json, stdout, stderr)?;
            Ok(None)
        }
    }
}

/// Runs the pipeline; the exit code.
pub fn run(
    args: RunArgs,
    home_flag: Option<&Path>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    // Invalid input: every problem, exit 2, nothing created.
    let Some(loaded) = load_or_report(&args.pipeline, args.output == Output::Json, stdout, stderr)?
    else {
        return Ok(exit::INVALID);
    };
    if args.backend == Backend::Local {
        let inf = &loaded.pipeline.infrastructure;
        if let Err(e) = kiln::local::network_supported(inf.network.mode)
            .and_then(|()| kiln::local::limits_supported(inf.limits))
        {
            writeln!(stderr, "{}: {e}", args.pipeline.display())?;
            return Ok(exit::INVALID);
        }
    }
    // An EC2 instance registers with SSM with its instance profile's role: launched without one
    // it never comes online, and the build would wait out its timeout with a builder running.
    if args.backend == Backend::Aws
        && loaded.pipeline.infrastructure.instance_profile.is_none()
        && args.instance_profile.is_none()
    {
        writeln!(
            stderr,
            "{}: infrastructure.instanceProfile: --backend aws launches the builder and test instances with an instance profile whose role lets their SSM agent register (ssm:UpdateInstanceInformation, ec2messages:*; AmazonSSMManagedInstanceCore has them); without one it comes online only where the account's Default Host Management Configuration registers instances, which kiln cannot see. Name it in infrastructure.instanceProfile or with --instance-profile NAME (kiln creates no IAM role)",
            args.pipeline.display()
        )?;
        return Ok(exit::INVALID);
    }
    let home = home(home_flag);
    let cloud = match open_cloud(&home) {
        Ok(c) => c,
        Err(e) => {
            writeln!(stderr, "kiln run: {e}")?;
            return Ok(exit::INVALID);
        }
    };
    let record = PipelineRecord::from(&loaded);
    let p = &record.pipeline;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // From here on Ctrl-C and SIGTERM are kiln's to handle: whatever they interrupt is cleaned up.
    let shutdown = Shutdown::catch(&runtime);
    let label = args.pipeline.display().to_string();
    if let Some(code) = check_parent(&cloud, &runtime, p, args.backend, &label, stderr)? {
        return Ok(code);
    }
    if let Err(e) = runtime.block_on(kiln::ports::Store::put_pipeline(&cloud.store, &record)) {
        writeln!(stderr, "{}: {e}", args.pipeline.display())?;
        return Ok(exit::INVALID);
    }
    let how = How {
        backend: args.backend,
        output: args.output,
        trigger: json!({"kind": "manual", "detail": "kiln run"}),
        shutdown,
        timeout: args.timeout,
    };
    match args.backend {
        Backend::Local => execute(Arc::new(cloud), &runtime, &record, how, stdout, stderr),
        Backend::Aws => aws(cloud, &runtime, &record, &args, how, stdout, stderr),
    }
}

/// Makes sure the parent image can be found: creates `kiln-tiny` on first use, names the
/// command that makes any other missing embedded parent. `Some(exit code)` to stop.
pub fn check_parent(
    cloud: &LocalCloud,
    runtime: &tokio::runtime::Runtime,
    p: &kiln::model::pipeline::Pipeline,
    backend: Backend,
    label: &str,
    stderr: &mut dyn Write,
) -> anyhow::Result<Option<i32>> {
    if backend == Backend::Local {
        if let Parent::Local(name) = &p.parent {
            let region = p.home_region();
            let found = runtime.block_on(kiln::ports::Compute::image_named(cloud, region, name));
            if matches!(found, Ok(None)) {
                if name == "kiln-tiny" {
                    writeln!(stderr, "creating the base image kiln-tiny in {region} from this machine's programs (offline)")?;
                    if let Err(e) = cloud.bootstrap_tiny(name, region) {
                        writeln!(stderr, "kiln run: {e}")?;
                        return Ok(Some(exit::FAILED));
                    }
                } else {
                    writeln!(stderr, "{label}: parent.local: no embedded image `{name}` in {region}; create it with `kiln image import {name} ROOTFS --region {region}` or `kiln image bootstrap {name} --region {region}`")?;
                    return Ok(Some(exit::INVALID));
                }
            }
        }
    } else if !matches!(
        p.parent,
        Parent::Ami(_) | Parent::SsmParameter(_) | Parent::Filter(_)
    ) {
        writeln!(stderr, "{label}: parent.local names an embedded image; --backend aws needs ami, ssmParameter or filter")?;
        return Ok(Some(exit::INVALID));
    }
    Ok(None)
}

/// The AWS ports for runs without a stack: an artifacts bucket, no table, no event bus.
#[cfg(feature = "aws")]
fn aws_ports(
    runtime: &tokio::runtime::Runtime,
    bucket: String,
    region: String,
    instance_profile: Option<String>,
) -> kiln::aws::AwsPorts {
    let settings = kiln::aws::Settings {
        table: String::new(),
        bucket,
        event_bus: String::new(),
        region,
        stack: None,
        instance_profile,
    };
    runtime.block_on(kiln::aws::AwsPorts::from_env(settings))
}

#[cfg(feature = "aws")]
fn aws(
    cloud: LocalCloud,
    runtime: &tokio::runtime::Runtime,
    record: &PipelineRecord,
    args: &RunArgs,
    how: How,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let region = record.pipeline.home_region().to_string();
    let bucket = args
        .artifacts_bucket
        .clone()
        .unwrap_or_else(|| format!("kiln-artifacts-{region}"));
    let remote = aws_ports(runtime, bucket, region, args.instance_profile.clone());
    if let Err(e) = runtime.block_on(remote.prepare_artifacts(&cloud.agent)) {
        writeln!(stderr, "kiln run --backend aws: {e}")?;
        return Ok(exit::FAILED);
    }
    let mixed = Arc::new(Mixed {
        remote,
        local: cloud,
    });
    execute(mixed, runtime, record, how, stdout, stderr)
}

#[cfg(not(feature = "aws"))]
fn aws(
    _cloud: LocalCloud,
    _runtime: &tokio::runtime::Runtime,
    _record: &PipelineRecord,
    _args: &RunArgs,
    _how: How,
    _stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    writeln!(
        stderr,
        "kiln run: this kiln was built without the AWS backend (cargo feature `aws`)"
    )?;
    Ok(exit::INVALID)
}

pub fn execute<P: PortsProvider + HasLocal + 'static>(
    provider: Arc<P>,
    runtime: &tokio::runtime::Runtime,
    record: &PipelineRecord,
    args: How,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let p = &record.pipeline;
    let local = provider.local();
    let mut machine = execution::machine(DEFINITION, &local_substitutions())
        .map_err(|e| anyhow::anyhow!("the built-in state machine: {e}"))?;
    if let Some(t) = args.timeout {
        machine.timeout_seconds = Some(t.as_secs_f64());
    }
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let clock: Arc<dyn Clock> = Arc::new(RealClock);
    let tasks = Arc::new(StageTaskAdapter::new(
        provider.clone(),
        timeline.clone(),
        clock.clone(),
        Some(LongPoll {
            limit: Duration::from_secs(10),
            interval: Duration::from_millis(10),
        }),
    ));
    let engine = Engine::new(tasks, clock.clone(), false).with_tokens(local.wakeups.tokens());
    let request = format!("kiln-run-{}", uuid::Uuid::new_v4().simple());
    // A wait for a local state change ends by the event source above (it reads the local cloud
    // every 10 ms), a wait with no event by the check's long poll; five seconds is the bound of
    // either when neither ends it.
    let input = execution::input(&p.name, &args.trigger, Some(5));
    let interactive = args.output == Output::Text && std::io::stderr().is_terminal();
    let started = Instant::now();
    writeln!(
        stderr,
        "kiln run {} {} — {} backend, building in {}, distributing to {}",
        p.name,
        p.version,
        match args.backend {
            Backend::Local => "embedded",
            Backend::Aws => "aws",
        },
        p.home_region(),
        p.distribution
            .iter()
            .map(|d| d.region.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let claim = local.claim_run(&request)?;
    let display = Display::start(timeline.clone(), local.home.clone(), interactive);
    let outcome: Result<Outcome, i32> = runtime.block_on(execution::run(
        &engine,
        &machine,
        input,
        &request,
        &timeline,
        args.shutdown.received(),
        local
            .wakeups
            .serve(provider.as_ref(), provider.event_interval()),
    ));
    display.stop();
    let _ = std::fs::remove_file(&claim);
    let outcome = match outcome {
        Ok(o) => o,
        Err(code) => {
            writeln!(stderr, "interrupted: cleaning up")?;
            let build = runtime.block_on(execution::cancel(
                &provider.ports(),
                &p.name,
                &request,
                "interrupted by the user (kiln run)",
            ));
            // A snapshot or copy in flight discards itself once written; wait for it.
            if !local.wait_for_jobs(Duration::from_secs(300)) {
                writeln!(
                    stderr,
                    "an image is still being written; `kiln gc` removes it"
                )?;
            }
            if let Some(b) = build {
                writeln!(stderr, "build {} {}", b.id, b.status.as_str())?;
            }
            return Ok(code);
        }
    };
    // An execution that ended on an error no Catch took (States.DataLimitExceeded,
    // States.Runtime, …) skipped the state machine's cleanup: the same cleanup as an
    // interruption's ends its instances, records it FAILED with the reason, releases the lock.
    let build = runtime.block_on(execution::build_of(&provider.ports(), &p.name, &request));
    if outcome.status != Status::Succeeded && build.as_ref().is_some_and(|b| !b.status.is_final()) {
        let error = outcome.error.as_deref().unwrap_or("States.Runtime");
        let cause = outcome.cause.as_deref().unwrap_or("the execution ended");
        runtime.block_on(execution::reap(
            &provider.ports(),
            &p.name,
            &request,
            error,
            cause,
        ));
        if !local.wait_for_jobs(Duration::from_secs(300)) {
            writeln!(
                stderr,
                "an image is still being written; `kiln gc` removes it"
            )?;
        }
    }
    // The build as the store has it now (the execution's output on success, the record after
    // cleanup on failure).
    let build = runtime.block_on(execution::build_of(&provider.ports(), &p.name, &request));
    let summary = summary(
        &outcome,
        build.as_ref(),
        &lock(&timeline),
        local,
        started.elapsed(),
    );
    match args.output {
        Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&summary)?)?,
        // The summary carries what the instance wrote (the failure's output tail).
        Output::Text => {
            let mut text = Vec::new();
            write_summary(&mut text, &summary)?;
            stdout.write_all(crate::terminal_safe(&String::from_utf8_lossy(&text)).as_bytes())?;
        }
    }
    Ok(match (outcome.status, build.map(|b| b.status)) {
        (Status::Succeeded, Some(BuildStatus::Available | BuildStatus::Skipped)) => exit::OK,
        _ => exit::FAILED,
    })
}

/// Whether the `kiln run` that started `build` still runs.
pub fn owner_alive(cloud: &LocalCloud, build: &Build) -> bool {
    build
        .request_id
        .as_deref()
        .is_some_and(|r| cloud.run_owner_alive(r))
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment this is made (before the build starts:
/// a signal that arrives before the first poll must not kill kiln with its default action).
#[derive(Debug)]
pub struct Shutdown {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    /// Installs the handlers (inside `runtime`).
    pub fn catch(runtime: &tokio::runtime::Runtime) -> Shutdown {
        let _guard = runtime.enter();
        use tokio::signal::unix::{signal, SignalKind};
        Shutdown {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The first signal; the exit code a shell reports for it (128 + its number).
    async fn received(mut self) -> i32 {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => futures::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(self.int.take()) => 128 + 2,
            _ = wait(self.term.take()) => 128 + 15,
        }
    }
}

/// The live display: a spinner per stage on a terminal, plain lines otherwise.
struct Display {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Display {
    fn start(timeline: Arc<Mutex<Timeline>>, home: PathBuf, interactive: bool) -> Display {
        // Stopping wakes the thread at once (a build's wall time should not wait for a tick).
        let (stop, wake) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let bar = interactive.then(|| {
                let b = indicatif::ProgressBar::new_spinner();
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {prefix:>10} {elapsed:>4} {wide_msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                b.enable_steady_tick(Duration::from_millis(100));
                b
            });
            let mut shown = std::collections::BTreeSet::new();
            let mut done = false;
            loop {
                let (stages, current, log) = {
                    let t = lock(&timeline);
                    let log = t.build.as_ref().and_then(|b| output_log(&home, b));
                    let mut stages = t.stages(chrono::Utc::now());
                    if done {
                        stages.iter_mut().for_each(|s| s.finished = true);
                    }
                    (stages, t.current().unwrap_or_default(), log)
                };
                // Finished stages, one line each, in the order they started.
                for s in stages.iter().filter(|s| s.finished) {
                    if shown.insert(s.name) {
                        let line = format!("  ✓ {:<10} {:>6.1}s", s.name, s.seconds());
                        match &bar {
                            Some(b) => b.println(line),
                            None => eprintln!("{line}"),
                        }
                    }
                }
                if done {
                    if let Some(b) = &bar {
                        b.finish_and_clear();
                    }
                    return;
                }
                if let Some(b) = &bar {
                    if b.prefix() != current {
                        b.reset_elapsed();
                        b.set_prefix(current);
                    }
                    let line = log.as_deref().map(last_line).unwrap_or_default();
                    b.set_message(line.chars().take(100).collect::<String>());
                }
                done = !matches!(
                    wake.recv_timeout(Duration::from_millis(100)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
            }
        });
        Display {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The run's result as data (what `--output json` prints).
fn summary(
    outcome: &Outcome,
    build: Option<&Build>,
    timeline: &Timeline,
    local: &LocalCloud,
    wall: Duration,
) -> Json {
    let stages: serde_json::Map<String, Json> = timeline
        .stages(chrono::Utc::now())
        .iter()
        .map(|s| (s.name.to_string(), json!(s.seconds())))
        .collect();
    let images: BTreeMap<String, String> = build
        .map(|b| {
            b.regions
                .iter()
                .filter_map(|r| r.image.as_ref().map(|i| (r.region.clone(), i.0.clone())))
                .collect()
        })
        .unwrap_or_default();
    // Each image writer: the snapshot in the home region, then a copy per other region.
    let jobs: Vec<Json> = build
        .map(|b| {
            let snapshot = b
                .image
                .iter()
                .map(|i| (b.home_region.clone(), i.clone(), "snapshot"));
            let copies = b
                .regions
                .iter()
                .filter_map(|r| r.image.clone().map(|i| (r.region.clone(), i, "copy")));
            let mut seen = std::collections::BTreeSet::new();
            snapshot
                .chain(copies)
                .filter(|(_, image, _)| seen.insert(image.clone()))
                .filter_map(|(region, image, kind)| {
                    local.job(image.as_str()).map(|j| {
                        json!({"region": region, "image": image, "kind": kind,
                               "seconds": j.seconds, "bytes": j.bytes})
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    // Time spent writing images (snapshot and copies), measured by the image writers.
    let image_io: f64 = jobs.iter().filter_map(|j| j["seconds"].as_f64()).sum();
    let aws_floor = kiln::stages::handler::aws_bill_floor(outcome);
    json!({
        "status": build.map(|b| b.status.as_str()).unwrap_or("FAILED"),
        "imageJobs": jobs,
        "build": build.map(|b| b.id.0.clone()),
        "pipeline": build.map(|b| b.pipeline.clone()),
        "version": build.map(Build::version),
        "images": images,
        "stages": stages,
        "seconds": (wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "imageWriteSeconds": (image_io * 1000.0).round() / 1000.0,
        "stateTransitions": outcome.state_transitions(),
        "taskInvocations": outcome.task_invocations(),
        "waits": execution::waits(outcome),
        "aws": {
            "minStateTransitions": aws_floor.0,
            "minLambdaInvocations": aws_floor.1,
            "perPoll": {
                "stateTransitions": kiln::stages::handler::AWS_POLL_COST.0,
                "lambdaInvocations": kiln::stages::handler::AWS_POLL_COST.1,
            },
            "pollSeconds": kiln::stages::handler::aws_poll_seconds(),
        },
        "error": outcome.error,
        "cause": outcome.cause,
        "failure": build.and_then(|b| b.failure.clone()),
    })
}

fn write_summary(out: &mut dyn Write, s: &Json) -> std::io::Result<()> {
    let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
    writeln!(
        out,
        "{} {} build {} {}",
        text("pipeline"),
        text("version"),
        text("build"),
        text("status")
    )?;
    if let Some(images) = s["images"].as_object() {
        for (region, id) in images {
            writeln!(out, "  {region:<16} {}", id.as_str().unwrap_or_default())?;
        }
    }
    if let Some(stages) = s["stages"].as_object() {
        let parts: Vec<String> = stages
            .iter()
            .map(|(k, v)| format!("{k} {:.1}s", v.as_f64().unwrap_or(0.0)))
            .collect();
        writeln!(
            out,
            "  time: {} (total {:.1}s)",
            parts.join(", "),
            s["seconds"].as_f64().unwrap_or(0.0)
        )?;
    }
    writeln!(
        out,
        "  in AWS this build would bill at least {} state transitions and {} Lambda invocations, plus {} and {} for every {} s poll while AWS works",
        s["aws"]["minStateTransitions"],
        s["aws"]["minLambdaInvocations"],
        s["aws"]["perPoll"]["stateTransitions"],
        s["aws"]["perPoll"]["lambdaInvocations"],
        s["aws"]["pollSeconds"]
    )?;
    if s["status"] != "AVAILABLE" && s["status"] != "SKIPPED" {
        if let Some(f) = s["failure"].as_object() {
            writeln!(
                out,
                "  failed in {}: {}\n{}",
                f.get("stage").and_then(Json::as_str).unwrap_or("-"),
                f.get("error").and_then(Json::as_str).unwrap_or("-"),
                f.get("message").and_then(Json::as_str).unwrap_or("-")
            )?;
        } else if let Some(cause) = s["cause"].as_str() {
            writeln!(out, "  {}: {cause}", s["error"].as_str().unwrap_or("error"))?;
        }
    }
    Ok(())
}

/// `kiln upload-agent`.
#[cfg(feature = "aws")]
pub fn upload_agent(
    bucket: &str,
    region: Option<String>,
    arch: &str,
    agent: Option<PathBuf>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let agent = match agent.map(Ok).unwrap_or_else(agent_binary) {
        Ok(a) => a,
        Err(e) => {
            writeln!(stderr, "kiln upload-agent: {e}")?;
            return Ok(exit::INVALID);
        }
    };
    let region = region
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ports = aws_ports(&runtime, bucket.to_string(), region, None);
    match runtime.block_on(ports.upload_agent(&agent, arch)) {
        Ok((key, sha)) => {
            // What the stack's AgentSha256 parameter must pin (`make deploy` computes the same).
            writeln!(stdout, "s3://{bucket}/{key} sha256 {sha}")?;
            Ok(exit::OK)
        }
        Err(e) => {
            writeln!(stderr, "kiln upload-agent: {e}")?;
            Ok(exit::FAILED)
        }
    }
}

#[cfg(not(feature = "aws"))]
pub fn upload_agent(
    _bucket: &str,
    _region: Option<String>,
    _arch: &str,
    _agent: Option<PathBuf>,
    _stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    writeln!(
        stderr,
        "kiln upload-agent: this kiln was built without the AWS backend (cargo feature `aws`)"
    )?;
    Ok(exit::INVALID)
}

/// `kiln lifecycle PIPELINE.yaml`: plan (and unless `dry_run`, apply) the pipeline's lifecycle.
pub fn lifecycle(
    file: &Path,
    dry_run: bool,
    backend: Backend,
    output: Output,
    home: &Path,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<i32> {
    let Some(loaded) = load_or_report(file, output == Output::Json, stdout, stderr)? else {
        return Ok(exit::INVALID);
    };
    let pipeline = &loaded.pipeline;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let agent = agent_binary().unwrap_or_else(|_| PathBuf::from("kiln-agent"));
    let local = LocalCloud::open(home, &agent)?;
    let result = match backend {
        Backend::Local => apply_lifecycle(&runtime, &local, pipeline, dry_run),
        Backend::Aws => lifecycle_aws(&runtime, &local, pipeline, dry_run),
    };
    let plan = match result {
        Ok(p) => p,
        Err(e) => {
            writeln!(stderr, "kiln lifecycle: {e}")?;
            return Ok(exit::FAILED);
        }
    };
    match output {
        Output::Json => writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&json!({"dryRun": dry_run, "actions": plan}))?
        )?,
        Output::Text => {
            if plan.is_empty() {
                writeln!(
                    stdout,
                    "nothing to do: every image of {} is within its lifecycle",
                    pipeline.name
                )?;
            }
            for a in &plan {
                writeln!(
                    stdout,
                    "{:<10} {:<14} {:<22} {:<40} {}",
                    if dry_run { "would" } else { "did" },
                    format!("{:?}", a.verdict).to_lowercase(),
                    a.image,
                    a.name,
                    a.reason
                )?;
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(feature = "aws")]
fn lifecycle_aws(
    runtime: &tokio::runtime::Runtime,
    local: &LocalCloud,
    pipeline: &kiln::model::pipeline::Pipeline,
    dry_run: bool,
) -> Result<Vec<kiln::stages::lifecycle::Action>, kiln::errors::StageError> {
    let remote = aws_ports(
        runtime,
        String::new(),
        pipeline.home_region().to_string(),
        None,
    );
    let mixed = Mixed {
        remote,
        local: LocalCloud::open(&local.home, &local.agent)?,
    };
    apply_lifecycle(runtime, &mixed, pipeline, dry_run)
}

/// Plans the lifecycle over `provider`'s ports and, unless `dry_run`, applies it.
fn apply_lifecycle<P: PortsProvider>(
    runtime: &tokio::runtime::Runtime,
    provider: &P,
    pipeline: &kiln::model::pipeline::Pipeline,
    dry_run: bool,
) -> Result<Vec<kiln::stages::lifecycle::Action>, kiln::errors::StageError> {
    runtime.block_on(async {
        let ports = provider.ports();
        let plan = kiln::stages::lifecycle::plan(&ports, pipeline).await?;
        if !dry_run {
            kiln::stages::lifecycle::apply(&ports, &plan).await?;
        }
        Ok(plan)
    })
}

#[cfg(not(feature = "aws"))]
fn lifecycle_aws(
    _runtime: &tokio::runtime::Runtime,
    _local: &LocalCloud,
    _pipeline: &kiln::model::pipeline::Pipeline,
    _dry_run: bool,
) -> Result<Vec<kiln::stages::lifecycle::Action>, kiln::errors::StageError> {
    Err(kiln::errors::StageError::new(
        kiln::errors::ErrorKind::InvalidPipeline,
        "this kiln was built without the AWS backend (cargo feature `aws`)",
    ))
}
