//! Running a process for a step: its own process group (so a timeout kills everything it
//! started), output captured in full and streamed to the console, a deadline.
//!
//! A step ends when its shell exits, as AWSTOE's do: what the step started in the background (a
//! daemon that forks away, `service nginx start`) keeps running until the instance stops, as on
//! an EC2 builder. Only a timeout kills the step's whole process group.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// What a finished (or killed) process left behind.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// `None` when it was killed by a signal or the timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub duration: Duration,
}

/// Runs `cmd` to completion or until `timeout`, in a new process group. Arguments and
/// environment are passed as data; nothing here builds shell source.
pub fn run(
    mut cmd: Command,
    cwd: &Path,
    timeout: Option<Duration>,
    echo: bool,
) -> std::io::Result<Finished> {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let ended = Arc::new(AtomicBool::new(false));
    let out = child
        .stdout
        .take()
        .map(|s| reader(s, echo, false, ended.clone()));
    let err = child
        .stderr
        .take()
        .map(|s| reader(s, echo, true, ended.clone()));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, timed_out) = match timeout {
        Some(t) => match rx.recv_timeout(t) {
            Ok(status) => (Some(status?), false),
            Err(_) => {
                let _ = killpg(pid, Signal::SIGKILL);
                (rx.recv().ok().and_then(Result::ok), true)
            }
        },
        None => (
            Some(
                rx.recv()
                    .map_err(|e| std::io::Error::other(e.to_string()))??,
            ),
            false,
        ),
    };
    // The shell has ended (or its group was killed): what it wrote is in the pipes now. The
    // readers take that and stop, though a process it left running holds the pipes open.
    ended.store(true, Ordering::Release);
    let stdout = out.and_then(|h| h.recv().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.recv().ok()).unwrap_or_default();
    Ok(Finished {
        exit_code: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        stdout,
        stderr,
        timed_out,
        duration: started.elapsed(),
    })
}

/// Reads a step's output until its end, or, once `ended` is set, what the pipe holds then:
/// everything the shell wrote was queued before it exited, and that is at most the pipe's
/// capacity. A background process that inherited the pipe may keep it open, and writing, for as
/// long as it runs: after the step's output is sent, the thread goes on reading and dropping
/// what comes until the pipe's end, so that such a process neither blocks on a full pipe nor
/// dies of SIGPIPE.
fn reader(
    mut stream: impl Read + AsFd + Send + 'static,
    echo: bool,
    is_err: bool,
    ended: Arc<AtomicBool>,
) -> mpsc::Receiver<String> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        let flags = fcntl(stream.as_fd(), FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
        // Should this fail, reads block until the pipe's end, as they did before.
        if let Ok(f) = flags {
            let _ = fcntl(stream.as_fd(), FcntlArg::F_SETFL(f | OFlag::O_NONBLOCK));
        }
        // What is left to read once the shell has ended.
        let mut left: Option<usize> = None;
        loop {
            if left.is_none() && ended.load(Ordering::Acquire) {
                left = Some(
                    fcntl(stream.as_fd(), FcntlArg::F_GETPIPE_SZ).map_or(1 << 20, |n| n as usize),
                );
            }
            let want = left.map_or(buf.len(), |l| l.min(buf.len()));
            if want == 0 {
                break;
            }
            match stream.read(&mut buf[..want]) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if left.is_some() {
                        break;
                    }
                    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(50u16));
                }
                Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if let Some(l) = left.as_mut() {
                        *l -= n;
                    }
                    if echo {
                        let _ = if is_err {
                            std::io::stderr().write_all(&buf[..n])
                        } else {
                            std::io::stdout().write_all(&buf[..n])
                        };
                    }
                }
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
        if let Ok(f) = flags {
            let _ = fcntl(stream.as_fd(), FcntlArg::F_SETFL(f - OFlag::O_NONBLOCK));
        }
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    rx
}

/// The last `n` characters of `text`, for reports.
pub fn tail(text: &str, n: usize) -> String {
    let count = text.chars().count();
    if count <= n {
        text.to_string()
    } else {
        text.chars().skip(count - n).collect()
    }
}

/// Refuses a folder another local user could change under the agent: the agent runs as root and
/// follows what it finds there (a step's relative paths, the saved state, the step scripts' own
/// folder). The folder and every folder above it must belong to root or to the agent's user, and
/// be writable by group or others only with the sticky bit (as `/tmp` is); a link on the way must
/// belong to root or the agent's user too (another user's link could point it anywhere).
/// `what` names the folder in the message ("work folder", "state folder").
pub fn check_folder(path: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == euid;
    let named = |e: std::io::Error, at: &Path| {
        format!("the {what} {}: {}: {e}", path.display(), at.display())
    };
    let abs = std::path::absolute(path).map_err(|e| named(e, path))?;
    let mut here = std::path::PathBuf::new();
    for c in abs.components() {
        here.push(c);
        let m = std::fs::symlink_metadata(&here).map_err(|e| named(e, &here))?;
        if m.file_type().is_symlink() && !trusted(m.uid()) {
            return Err(format!(
                "the {what} {} is refused: {} is a link owned by uid {}, neither root nor the agent's user (uid {euid}); that user could point it anywhere",
                path.display(),
                here.display(),
                m.uid()
            ));
        }
    }
    let real = std::fs::canonicalize(&abs).map_err(|e| named(e, &abs))?;
    for dir in real.ancestors() {
        let m = std::fs::metadata(dir).map_err(|e| named(e, dir))?;
        let which = if dir == real {
            format!("the {what} {}", path.display())
        } else {
            format!(
                "the {what} {}: the folder above it, {},",
                path.display(),
                dir.display()
            )
        };
        if !m.is_dir() {
            return Err(format!("{which} is not a folder"));
        }
        if !trusted(m.uid()) {
            return Err(format!(
                "{which} is owned by uid {}, neither root nor the agent's user (uid {euid}): that user could plant links the agent would follow; use a folder of root's or the agent's own",
                m.uid()
            ));
        }
        let mode = m.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "{which} is writable by {} (mode {mode:04o}) without the sticky bit: other users could replace what the agent puts there; `chmod go-w` it",
                if mode & 0o002 != 0 { "others" } else { "its group" }
            ));
        }
    }
    Ok(())
}

/// Where step scripts get their private folders: the state folder (created 0700 when missing,
/// and checked like the work folder). When the agent's user cannot create it (a user trying a
/// component on a laptop, with the default `/var/lib/kiln-agent`), `$XDG_RUNTIME_DIR` or the
/// temporary folder, checked the same way: a fresh 0700 folder opened without following links is
/// private in any of them.
pub fn script_base(state_dir: &Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
    {
        Ok(()) => {
            check_folder(state_dir, "state folder")?;
            return Ok(state_dir.to_path_buf());
        }
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            return Err(format!(
                "cannot create the state folder {}: {e}",
                state_dir.display()
            ))
        }
        Err(_) => {}
    }
    let fallbacks = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain([std::env::temp_dir()]);
    let mut refused = Vec::new();
    for dir in fallbacks {
        match check_folder(&dir, "folder for step scripts") {
            Ok(()) => return Ok(dir),
            Err(e) => refused.push(e),
        }
    }
    Err(format!(
        "the state folder {} cannot be created, and {}",
        state_dir.display(),
        refused.join("; ")
    ))
}

/// A step's script: written into a fresh private folder (random name, 0700, made by `mkdtemp`)
/// as a new file (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0700), opened for bash, and unlinked with its
/// folder before bash starts. bash reads it through an inherited descriptor (`/dev/fd/N`), so no
/// path to it exists while the step runs, and dropping it overwrites the content with zeros: the
/// substituted values (`ssm-secure` ones included) stay neither under a name nor in the freed
/// blocks of a disk that may become an image.
#[derive(Debug)]
pub struct Script {
    /// Kept to zero the content when the step is over.
    file: std::fs::File,
    /// bash's end: not close-on-exec, so the step's bash inherits it.
    for_bash: std::os::fd::OwnedFd,
    len: u64,
}

impl Script {
    pub fn create(base: &Path, body: &[u8]) -> Result<Script, String> {
        use nix::fcntl::{openat, OFlag};
        use nix::sys::stat::{fstat, Mode};
        use nix::unistd::{unlinkat, UnlinkatFlags};
        let dir = nix::unistd::mkdtemp(&base.join(".kiln-step-XXXXXXXX")).map_err(|e| {
            format!(
                "cannot create a private folder for the script in {}: {e}",
                base.display()
            )
        })?;
        let fd = nix::fcntl::open(
            &dir,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        );
        let made = fd.map_err(|e| e.to_string()).and_then(|fd| {
            let st = fstat(&fd).map_err(|e| e.to_string())?;
            if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o7777 != 0o700 {
                return Err("it is not the agent's own 0700 folder".to_string());
            }
            let name = "script.sh";
            let file = openat(
                &fd,
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_RDWR
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o700),
            )
            .map(std::fs::File::from)
            .map_err(|e| e.to_string());
            let opened = file.and_then(|mut file| {
                file.write_all(body).map_err(|e| e.to_string())?;
                let for_bash = openat(
                    &fd,
                    name,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| e.to_string())?;
                Ok(Script {
                    file,
                    for_bash,
                    len: body.len() as u64,
                })
            });
            let _ = unlinkat(&fd, name, UnlinkatFlags::NoRemoveDir);
            opened
        });
        let _ = std::fs::remove_dir(&dir);
        made.map_err(|e| format!("cannot write the script in {}: {e}", dir.display()))
    }

    /// The path bash reads the script from: its inherited descriptor.
    pub fn path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/dev/fd/{}", self.for_bash.as_raw_fd())
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; self.len as usize];
        let _ = self.file.write_all_at(&zeros, 0);
        let _ = self.file.sync_data();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_has_no_name_while_bash_runs_it_and_leaves_nothing() {
        // GIVEN a folder for scripts
        let base = tempfile::tempdir().expect("tempdir");
        // WHEN a script is made there and bash runs it through its descriptor
        let script = Script::create(base.path(), b"echo from-the-descriptor\n").expect("script");
        let named: Vec<_> = std::fs::read_dir(base.path())
            .expect("list")
            .flatten()
            .map(|e| e.path())
            .collect();
        let out = Command::new("bash")
            .arg(script.path())
            .output()
            .expect("bash");
        drop(script);
        // THEN bash read it, and neither it nor its folder had a name meanwhile or after
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "from-the-descriptor\n"
        );
        assert_eq!(named, Vec::<std::path::PathBuf>::new());
        assert_eq!(std::fs::read_dir(base.path()).expect("list").count(), 0);
    }
}
