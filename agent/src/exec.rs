//! Running a process for a step: its own process group (so a timeout kills everything it
//! started), output captured in full and streamed to the console, a deadline.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
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
    let out = child.stdout.take().map(|s| reader(s, echo, false));
    let err = child.stderr.take().map(|s| reader(s, echo, true));
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
    // The group may have left processes holding the pipes open; they go with the step.
    let _ = killpg(pid, Signal::SIGKILL);
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
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

fn reader(
    mut stream: impl Read + Send + 'static,
    echo: bool,
    is_err: bool,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
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
        String::from_utf8_lossy(&all).into_owned()
    })
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
