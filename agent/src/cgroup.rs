//! Limits of an embedded instance: a cgroup of its own (v2 when the machine has the unified
//! hierarchy at /sys/fs/cgroup, the v1 `pids` and `memory` controllers otherwise), under the
//! folders `kiln::confine` names. Without one the keeper refuses to start the instance, unless
//! the pipeline opted out with `infrastructure.limits: none`: rlimits are not a fallback
//! (RLIMIT_NPROC does not bind root, and no rlimit bounds memory). The host removes the folders
//! once the keeper has ended (after `pivot_root` the keeper no longer sees them).

use std::fs;
use std::path::{Path, PathBuf};

use kiln::confine::{cgroup_parents, host_uid, is_cgroup2, CGROUP_ROOT, V1_CONTROLLERS};

use crate::sandbox::Limits;

/// How the instance is confined, for its keeper.log, and the cgroup folders it was put in.
#[derive(Debug, Default)]
pub struct Confined {
    pub how: String,
    pub dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("write {value} to {}: {e}", path.display()))
}

fn create(dir: &Path, uid: u32) -> Result<(), String> {
    let mut made = Ok(());
    for _ in 0..3 {
        made = if uid == 0 {
            fs::create_dir_all(dir)
        } else {
            // An ordinary user's parent is root's to delegate: only the instance's own folder
            // is made.
            fs::create_dir(dir)
        };
        // ENOENT: another instance's clean-up removed the empty parent in between.
        if !made
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound && uid == 0)
        {
            break;
        }
    }
    made.map_err(|e| format!("create {}: {e}", dir.display()))
}

/// Puts the calling process (and so everything it starts from now on) into a cgroup for
/// instance `id` bounded by `limits`; `None` is the pipeline's explicit `limits: none`.
pub fn confine(id: &str, limits: Option<Limits>) -> Result<Confined, String> {
    let Some(limits) = limits else {
        return Ok(Confined {
            how: "none (infrastructure.limits: none): no cgroup, the instance is unbounded".into(),
            dirs: Vec::new(),
        });
    };
    let pid = std::process::id().to_string();
    let uid = host_uid();
    let parents = cgroup_parents(uid);
    let mut dirs = Vec::new();
    let attempt = (|| {
        if is_cgroup2() {
            let dir = parents[0].join(id);
            create(&dir, uid)?;
            dirs.push(dir.clone());
            if uid == 0 {
                for parent in [Path::new(CGROUP_ROOT), parents[0].as_path()] {
                    write(&parent.join("cgroup.subtree_control"), "+pids +memory")?;
                }
            }
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
            write(&dir.join("memory.max"), &limits.memory.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            write(&dir.join("cgroup.procs"), &pid)?;
            return Ok(format!(
                "cgroup v2 {}: pids.max={} memory.max={}",
                dir.display(),
                limits.pids,
                limits.memory
            ));
        }
        for ((_, file), parent) in V1_CONTROLLERS.iter().zip(&parents) {
            let dir = parent.join(id);
            create(&dir, uid)?;
            dirs.push(dir.clone());
            let value = if *file == "pids.max" {
                limits.pids
            } else {
                limits.memory
            };
            write(&dir.join(file), &value.to_string())?;
        }
        // Joined once every limit is set, so a failure leaves folders that can be removed.
        for dir in &dirs {
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok::<String, String>(format!(
            "cgroup v1 {}: pids.max={} memory.limit_in_bytes={}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            limits.pids,
            limits.memory
        ))
    })();
    match attempt {
        Ok(how) => Ok(Confined { how, dirs }),
        Err(e) => {
            for d in dirs.iter().rev() {
                let _ = fs::remove_dir(d);
            }
            Err(format!(
                "limits: no cgroup for the instance ({e}); kiln does not start an instance it cannot bound unless the pipeline says `infrastructure.limits: none`"
            ))
        }
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
