//! The in-sandbox half of an embedded instance, in the agent binary because it must start as a
//! fresh single-threaded process (a multithreaded process cannot enter a mount namespace).
//!
//! - `boot` (the instance's keeper, started by kiln on the host): new mount, UTS, IPC and PID
//!   namespaces, and network unless the pipeline shares the host's (`network: private` reaches
//!   out through slirp4netns, see `usernet`); the image layers as overlay lower dirs under the
//!   instance's own upper dir; minimal /dev, /sys; the agent folder read-only at `/.kiln` and the
//!   instance's command folder at `/.kiln/cmd`; `pivot_root`; then it starts `init` as PID 1 of the
//!   new PID namespace and waits for it. Every mount lives in the keeper's private mount
//!   namespace, so nothing is left on the host when the instance ends.
//! - `init`: PID 1 inside, run from the read-only `/.kiln` copy of the agent and not dumpable
//!   (`/proc/1/exe`, its handles and ptrace are closed to the instance); mounts /proc, masks what
//!   Docker masks, says `ready`, reaps orphans until killed.
//! - `exec`: joins a running instance's namespaces and root, then runs the agent there.
//!
//! Every process of an instance starts in a session of its own, without a controlling terminal:
//! kiln's terminal is the operator's, and TIOCSTI into it would type into their shell.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{chdir, chroot, fchdir, pivot_root, sethostname};

use kiln::model::pipeline::Network;

/// Where the agent folder appears inside a sandbox.
pub const AGENT_MOUNT: &str = "/.kiln";
/// The line `init` prints once the instance is up.
pub const READY: &str = "kiln-agent init: ready";
/// Files a keeper created only to mount over (kept out of images), one path per line.
pub const SCAFFOLD_FILE: &str = "scaffold";

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What `boot` needs, as kiln passes it.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The instance folder: `upper/`, `work/`, `rootfs/`, `cmd/`, `console.log`, `init.pid`.
    pub instance_dir: PathBuf,
    /// Image layers, topmost first.
    pub lower: Vec<PathBuf>,
    pub hostname: String,
    pub network: Network,
    /// The agent folder: `kiln-agent`, `ld.so`, `lib/`, an empty `cmd/`. Also where init runs
    /// from (through the read-only bind).
    pub agent_dir: PathBuf,
    /// Skip the posture (capabilities, no_new_privs, seccomp, masked /proc, nodev): the
    /// pipeline's explicit `infrastructure.privileged: true`.
    pub privileged: bool,
    /// Destinations a private network lets through its default-deny (`network.allow`).
    pub allow: Vec<String>,
    /// Processes and bytes of memory the instance may use; `None` is the pipeline's explicit
    /// `limits: none`.
    pub limits: Option<Limits>,
}

/// What one instance may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub pids: u64,
    pub memory: u64,
}

/// Files in the instance folder the keeper writes for the host.
pub const CGROUPS_FILE: &str = "cgroups";
pub const BOOTS_FILE: &str = "boots";

/// Mount targets of the root file system: each must be a real folder of the image, never a link
/// (the mount would follow it out of the root).
const MOUNT_POINTS: &[&str] = &["/.kiln", "/dev", "/sys", "/proc", "/etc"];

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        fail(
            &format!(
                "mount {} on {}",
                fstype.or(src).unwrap_or("-"),
                target.display()
            ),
            e,
        )
    })
}

/// Creates `path` (a directory) in the root file system if it is missing, recording it as
/// scaffolding when the image did not have it.
fn ensure_dir(root: &Path, rel: &str, scaffold: &mut Vec<String>) -> Result<PathBuf, String> {
    let p = root.join(rel.trim_start_matches('/'));
    if fs::symlink_metadata(&p).is_err() {
        fs::create_dir_all(&p).map_err(|e| fail(&format!("create {rel}"), e))?;
        scaffold.push(rel.to_string());
    }
    Ok(p)
}

fn ensure_file(root: &Path, rel: &str, scaffold: &mut Vec<String>) -> Result<PathBuf, String> {
    let p = root.join(rel.trim_start_matches('/'));
    if fs::symlink_metadata(&p).is_err() {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| fail(&format!("create {rel}"), e))?;
        }
        File::create(&p).map_err(|e| fail(&format!("create {rel}"), e))?;
        scaffold.push(rel.to_string());
    }
    Ok(p)
}

/// Refuses a root file system whose mount points are links (or anything but folders).
fn check_mount_points(root: &Path) -> Result<(), String> {
    for p in MOUNT_POINTS {
        let path = root.join(p.trim_start_matches('/'));
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "the image's {p} is a symbolic link; kiln mounts there and will not follow it"
                ))
            }
            Ok(m) if !m.is_dir() => return Err(format!("the image's {p} is not a folder")),
            _ => {}
        }
    }
    Ok(())
}

/// The keeper: sets the instance up, runs `init` as its PID 1 and returns init's exit status.
pub fn boot(b: &Boot) -> Result<i32, String> {
    let d = &b.instance_dir;
    let root = d.join("rootfs");
    // A cgroup of its own first: the network helper started below is charged to it, and the
    // cgroup namespace below starts at it. No cgroup, no instance (unless `limits: none`).
    let confined = crate::cgroup::confine(&b.hostname, b.limits)?;
    eprintln!("kiln-agent sandbox: limits: {}", confined.how);
    let cgroups: String = confined
        .dirs
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    fs::write(d.join(CGROUPS_FILE), cgroups).map_err(|e| fail("record the cgroups", e))?;
    // The network helper and the egress policy next, while the keeper is in the host's network
    // namespace (the helper stays there; the policy needs the host's addresses).
    let usernet = match b.network {
        Network::Private => Some((
            crate::usernet::Policy::for_instance(&b.allow)?,
            crate::usernet::prepare()?,
        )),
        Network::Host | Network::None => None,
    };
    let boots = fs::read_to_string(d.join(BOOTS_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    fs::write(d.join(BOOTS_FILE), boots.to_string()).map_err(|e| fail("count boots", e))?;
    // An ordinary user: a user namespace first, where the user is root (one mapping, as rootless
    // podman without subordinate ids); every namespace below belongs to it.
    let rootless = !nix::unistd::geteuid().is_root();
    // Root of a user namespace kiln runs in (an ordinary user with subordinate ids) is no more
    // the machine's root than an ordinary user.
    let unprivileged = rootless || kiln::userns::in_child_userns();
    if rootless {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
            fail(
                "create a user namespace",
                format!("{e} (an ordinary user's instances need user namespaces)"),
            )
        })?;
        fs::write("/proc/self/setgroups", "deny").map_err(|e| fail("deny setgroups", e))?;
        fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
            .map_err(|e| fail("map the user", e))?;
        fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
            .map_err(|e| fail("map the group", e))?;
    }
    let unshare_or_say = |flags: CloneFlags| {
        unshare(flags).map_err(|e| {
            fail(
                "create namespaces",
                if e == Errno::EPERM {
                    "not permitted (as root, kiln-agent needs CAP_SYS_ADMIN)".to_string()
                } else {
                    e.to_string()
                },
            )
        })
    };
    // The network namespace on its own, before the PID namespace: the policy's `nft` runs in
    // it, and a child started after CLONE_NEWPID would become (and, ending, take down) the
    // new PID namespace's init.
    if b.network != Network::Host {
        unshare_or_say(CloneFlags::CLONE_NEWNET)?;
    }
    // The policy before the helper is let go: the network never exists unfiltered.
    if let Some((policy, usernet)) = usernet {
        policy.install()?;
        usernet.start()?;
    }
    unshare_or_say(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWCGROUP,
    )?;
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let lower: Vec<String> = b.lower.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}{}",
        lower.join(":"),
        d.join("upper").display(),
        d.join("work").display(),
        // In a user namespace overlayfs keeps its marks in user.* xattrs (trusted.* is root's).
        if unprivileged { ",userxattr" } else { "" }
    );
    if options.len() >= 4000 {
        return Err(format!(
            "the image has too many layers ({}) for one overlay mount",
            lower.len()
        ));
    }
    // nodev: a device node that an image carries (or a component makes) opens nothing.
    let root_flags = if b.privileged {
        MsFlags::empty()
    } else {
        MsFlags::MS_NODEV
    };
    mnt(
        Some("overlay"),
        &root,
        Some("overlay"),
        root_flags,
        Some(&options),
    )
    .map_err(|e| {
        if unprivileged {
            format!("{e} (an ordinary user's overlay mount needs Linux 5.11 or later)")
        } else {
            e
        }
    })?;
    check_mount_points(&root)?;

    let mut scaffold = Vec::new();
    // The agent, read-only, and the instance's command folder under it.
    let agent_at = ensure_dir(&root, AGENT_MOUNT, &mut scaffold)?;
    mnt(
        b.agent_dir.to_str(),
        &agent_at,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mnt(
        None,
        &agent_at,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )?;
    mnt(
        d.join("cmd").to_str(),
        &agent_at.join("cmd"),
        None,
        MsFlags::MS_BIND,
        None,
    )?;

    // /dev: a tmpfs with the host's harmless devices bound in. Not /dev/tty: no instance
    // process has a controlling terminal, and kiln's is the operator's.
    let dev = ensure_dir(&root, "/dev", &mut scaffold)?;
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom"] {
        let target = dev.join(name);
        File::create(&target).map_err(|e| fail(&format!("create /dev/{name}"), e))?;
        mnt(
            Some(&format!("/dev/{name}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(to, dev.join(name)).map_err(|e| fail(&format!("link /dev/{name}"), e))?;
    }
    for sub in ["pts", "shm"] {
        fs::create_dir(dev.join(sub)).map_err(|e| fail(&format!("create /dev/{sub}"), e))?;
    }
    mnt(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    mnt(
        Some("shm"),
        &dev.join("shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=65536k"),
    )?;

    // /sys, read-only: its own when the network is the sandbox's, the host's otherwise.
    let sys = ensure_dir(&root, "/sys", &mut scaffold)?;
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mnt(Some("sysfs"), &sys, Some("sysfs"), ro, None).is_err() {
        // The host's, without what is mounted under it, and read-only.
        mnt(Some("/sys"), &sys, None, MsFlags::MS_BIND, None)?;
        mnt(
            None,
            &sys,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro,
            None,
        )?;
    }
    ensure_dir(&root, "/proc", &mut scaffold)?;
    // Name resolution: the host's servers when it shares the host's network, slirp4netns's
    // forwarder when private. A copy in the instance folder is what the instance sees, so
    // writing its /etc/resolv.conf changes nothing of the host's.
    let host_resolv = fs::read_to_string("/etc/resolv.conf").ok();
    let resolv = match (b.network, host_resolv) {
        (Network::Host, Some(text)) => Some(text),
        (Network::Private, host) => Some(crate::usernet::resolv_conf(&host.unwrap_or_default())),
        _ => None,
    };
    if let Some(text) = resolv {
        let copy = d.join("resolv.conf");
        fs::write(&copy, text).map_err(|e| fail("write resolv.conf", e))?;
        let target = ensure_file(&root, "/etc/resolv.conf", &mut scaffold)?;
        if fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
            mnt(copy.to_str(), &target, None, MsFlags::MS_BIND, None)?;
        }
    }
    let mut record = OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join(SCAFFOLD_FILE))
        .map_err(|e| fail("record scaffolding", e))?;
    for s in &scaffold {
        writeln!(record, "{s}").map_err(|e| fail("record scaffolding", e))?;
    }
    sethostname(&b.hostname).map_err(|e| fail("set the hostname", e))?;

    // Handles opened on the host before the host disappears.
    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("console.log"))
        .map_err(|e| fail("open the console log", e))?;
    let mut pid_file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o644)
        .open(d.join("init.pid"))
        .map_err(|e| fail("open init.pid", e))?;

    // init enters the root itself: it mounts /proc there first, while the host's /proc is still
    // in view (in a user namespace the kernel allows a new proc only then). It runs from the
    // read-only bind, not the host's kiln-agent: /proc/1/exe leads nowhere writable.
    let mut init = Command::new(agent_at.join("kiln-agent"));
    new_session(&mut init);
    instance_env(&mut init)
        .args(["sandbox", "init", "--root"])
        .arg(&root);
    if b.privileged {
        init.arg("--privileged");
    }
    init.stdin(Stdio::null())
        .stdout(console.try_clone().map_err(|e| fail("console", e))?)
        .stderr(console);
    let mut child = init.spawn().map_err(|e| fail("start init", e))?;
    write!(pid_file, "{}", child.id()).map_err(|e| fail("write init.pid", e))?;
    drop(pid_file);
    let status = child.wait().map_err(|e| fail("wait for init", e))?;
    Ok(exit_code(status))
}

/// The agent as a program inside a sandbox: through the loader it was copied with, so it runs
/// whatever C library the image has (or none).
fn agent_command(args: &[&str]) -> Command {
    let mut c = Command::new(format!("{AGENT_MOUNT}/ld.so"));
    c.arg("--library-path")
        .arg(format!("{AGENT_MOUNT}/lib"))
        .arg(format!("{AGENT_MOUNT}/kiln-agent"))
        .args(args);
    instance_env(&mut c);
    c
}

/// Starts `c` in a new session: it and everything it starts have no controlling terminal, so
/// kiln's terminal (TIOCSTI types into the operator's shell) is out of their reach, and
/// /dev/tty opens nothing.
#[allow(unsafe_code)]
fn new_session(c: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec; setsid is async-signal-safe and touches no
    // memory.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        })
    }
}

/// The environment processes of an instance start with (none of kiln's).
fn instance_env(c: &mut Command) -> &mut Command {
    c.env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Parts of /proc an instance reads but must not write (Docker's and podman's list).
const PROC_READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
/// Parts of /proc and /sys an instance does not see at all: Docker's list (moby's
/// `oci/defaults.go`) and podman's (containers-common's `DefaultMaskedPaths`) together, and
/// each CPU's `thermal_throttle` ([`masked_paths`] adds those).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
    "/sys/fs/selinux",
];

/// [`MASKED`] and the `thermal_throttle` folder of each CPU that has one.
fn masked_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = MASKED.iter().map(PathBuf::from).collect();
    if let Ok(cpus) = fs::read_dir("/sys/devices/system/cpu") {
        paths.extend(
            cpus.flatten()
                .map(|e| e.path().join("thermal_throttle"))
                .filter(|p| p.is_dir()),
        );
    }
    paths
}

/// Read-only binds and masks over /proc and /sys, as OCI runtimes set them up.
fn mask_proc() -> Result<(), String> {
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for p in PROC_READ_ONLY {
        let path = Path::new(p);
        if fs::symlink_metadata(path).is_err() {
            continue;
        }
        mnt(
            Some(p),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        mnt(
            None,
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro,
            None,
        )?;
    }
    for path in masked_paths() {
        let path = path.as_path();
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => mnt(Some("tmpfs"), path, Some("tmpfs"), ro, Some("size=0"))?,
            Ok(_) => mnt(Some("/dev/null"), path, None, MsFlags::MS_BIND, None)?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// PID 1 of a sandbox: mounts /proc, takes the posture, reports ready, reaps orphans. Ends when
/// killed.
pub fn init(privileged: bool, root: Option<&Path>) -> Result<i32, String> {
    // The instance ends with its keeper, however the keeper ends (a SIGKILL included).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| fail("tie init to its keeper", e))?;
    // Not dumpable: without CAP_SYS_PTRACE no process of the instance reads /proc/1/exe, fd/,
    // mem or environ, nor ptraces init (which holds handles of the host's, console.log first).
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail("make init undumpable", e))?;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match root {
        Some(root) => {
            mnt(
                Some("proc"),
                &root.join("proc"),
                Some("proc"),
                proc_flags,
                None,
            )?;
            chdir(root).map_err(|e| fail("enter the root", e))?;
            pivot_root(".", ".").map_err(|e| fail("pivot_root", e))?;
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail("detach the host root", e))?;
            chdir("/").map_err(|e| fail("chdir /", e))?;
        }
        None => mnt(
            Some("proc"),
            Path::new("/proc"),
            Some("proc"),
            proc_flags,
            None,
        )?,
    }
    if !privileged {
        mask_proc()?;
        crate::posture::harden()?;
    }
    println!("{READY}");
    let _ = std::io::stdout().flush();
    loop {
        match nix::sys::wait::waitpid(None, None) {
            Err(Errno::ECHILD) => std::thread::sleep(std::time::Duration::from_millis(250)),
            Err(Errno::EINTR) | Ok(_) => {}
            Err(e) => return Err(fail("wait", e)),
        }
    }
}

/// Joins the instance whose PID 1 is `pid` (a host PID) and runs the agent there with `args`,
/// in `cwd`; returns the agent's exit code.
pub fn exec(
    pid: u32,
    cwd: &str,
    args: &[String],
    cgroups: &[PathBuf],
    privileged: bool,
) -> Result<i32, String> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    crate::cgroup::join(cgroups)?;
    // An ordinary user's instance: its user namespace first, which gives the rights to join
    // the others.
    let theirs = fs::read_link(proc_dir.join("ns/user")).ok();
    if theirs.is_some() && theirs != fs::read_link("/proc/self/ns/user").ok() {
        let f =
            File::open(proc_dir.join("ns/user")).map_err(|e| fail("open the user namespace", e))?;
        setns(&f, CloneFlags::CLONE_NEWUSER).map_err(|e| fail("join the user namespace", e))?;
    }
    let root = File::open(proc_dir.join("root"))
        .map_err(|e| fail(&format!("instance init {pid} is not running"), e))?;
    for (ns, flag) in [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let f = File::open(proc_dir.join("ns").join(ns))
            .map_err(|e| fail(&format!("open the {ns} namespace"), e))?;
        setns(&f, flag).map_err(|e| fail(&format!("join the {ns} namespace"), e))?;
    }
    fchdir(&root).map_err(|e| fail("enter the root", e))?;
    chroot(".").map_err(|e| fail("chroot", e))?;
    chdir("/").map_err(|e| fail("chdir /", e))?;
    if !privileged {
        crate::posture::harden()?;
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = agent_command(&args);
    new_session(&mut c);
    if !cwd.is_empty() {
        c.current_dir(cwd);
    }
    let status = c
        .status()
        .map_err(|e| fail("start the agent in the sandbox", e))?;
    Ok(exit_code(status))
}
