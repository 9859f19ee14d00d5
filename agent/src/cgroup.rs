//! Limits of an embedded instance: a cgroup of its own (v2 when the machine has the unified
//! hierarchy at /sys/fs/cgroup, the v1 `pids` and `memory` controllers otherwise), or rlimits
//! where no cgroup can be written (an unprivileged user without delegation). The host removes
//! the folders once the keeper has ended (after `pivot_root` the keeper no longer sees them).

use std::fs;
use std::path::{Path, PathBuf};

use crate::sandbox::Limits;

const ROOT: &str = "/sys/fs/cgroup";

/// How the instance is confined, for its keeper.log, and the cgroup folders it was put in.
#[derive(Debug, Default)]
pub struct Confined {
    pub how: String,
    pub dirs: Vec<PathBuf>,
}

fn is_cgroup2(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("write {value} to {}: {e}", path.display()))
}

/// Puts the calling process (and so everything it starts) into a cgroup for instance `id`.
pub fn confine(id: &str, limits: Limits) -> Confined {
    let pid = std::process::id().to_string();
    let mut errors = Vec::new();
    if is_cgroup2(ROOT) {
        let base = Path::new(ROOT).join("kiln");
        let dir = base.join(id);
        let attempt = (|| {
            fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            for parent in [Path::new(ROOT), base.as_path()] {
                write(&parent.join("cgroup.subtree_control"), "+pids +memory")?;
            }
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
            write(&dir.join("memory.max"), &limits.memory.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            write(&dir.join("cgroup.procs"), &pid)
        })();
        match attempt {
            Ok(()) => {
                return Confined {
                    how: format!(
                        "cgroup v2 {}: pids.max={} memory.max={}",
                        dir.display(),
                        limits.pids,
                        limits.memory
                    ),
                    dirs: vec![dir],
                }
            }
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                errors.push(e);
            }
        }
    } else {
        let mut dirs = Vec::new();
        let attempt = (|| {
            for (controller, file, value) in [
                ("pids", "pids.max", limits.pids),
                ("memory", "memory.limit_in_bytes", limits.memory),
            ] {
                let dir = Path::new(ROOT).join(controller).join("kiln").join(id);
                fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
                dirs.push(dir.clone());
                write(&dir.join(file), &value.to_string())?;
                write(&dir.join("cgroup.procs"), &pid)?;
            }
            Ok::<(), String>(())
        })();
        match attempt {
            Ok(()) => {
                return Confined {
                    how: format!(
                        "cgroup v1 pids.max={} memory.limit_in_bytes={}",
                        limits.pids, limits.memory
                    ),
                    dirs,
                }
            }
            Err(e) => {
                for d in &dirs {
                    let _ = fs::remove_dir(d);
                }
                errors.push(e);
            }
        }
    }
    // No cgroup: what rlimits can do. RLIMIT_NPROC counts the user's processes (the host's root
    // is exempt); memory has no per-instance rlimit that programs tolerate (RLIMIT_AS breaks
    // runtimes that reserve address space), so it is not bounded.
    use nix::sys::resource::{setrlimit, Resource};
    let _ = setrlimit(Resource::RLIMIT_NPROC, limits.pids, limits.pids);
    Confined {
        how: format!(
            "rlimit RLIMIT_NPROC={}, memory not bounded (no cgroup: {})",
            limits.pids,
            errors.join("; ")
        ),
        dirs: Vec::new(),
    }
}

/// Joins the cgroups an instance's keeper recorded (a process entering the instance).
pub fn join(dirs: &[PathBuf]) -> Result<(), String> {
    let pid = std::process::id().to_string();
    for d in dirs {
        write(&d.join("cgroup.procs"), &pid)?;
    }
    Ok(())
}
