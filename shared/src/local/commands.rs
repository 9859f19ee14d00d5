//! Embedded commands: kiln-agent run inside the instance (joined with `kiln-agent sandbox exec`),
//! its documents, parameters, report, logs and progress in `instances/<id>/cmd/<command>/`,
//! which the sandbox sees at `/.kiln/cmd/<command>/`. Exit code 194 reboots the instance (the
//! keeper is restarted over the same upper dir) and the command runs again; the agent resumes
//! from its state file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::beneath::{self, Folder};
use super::compute::Host;
use super::{io_error, ready, LocalCloud};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{CommandId, InstanceId};
use crate::ports::{CommandPlan, CommandStatus, Commands, InstanceState, PortResult};

/// The largest `report.json` (or `status.json`) the host reads from a command folder: the
/// instance writes there, and the host reads it into its memory.
const REPORT_LIMIT: u64 = 1 << 20;

/// The most reboots one command may ask for.
const MAX_REBOOTS: u32 = 5;
const REBOOT: i32 = 194;

/// A command this process started.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    status: Arc<Mutex<CommandStatus>>,
}

fn set(status: &Mutex<CommandStatus>, value: CommandStatus) {
    *status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
}

/// Runs the command to its end (through reboots); the final status.
fn run_to_end(
    host: &Host,
    instance: &str,
    cid: &str,
    args: &[String],
    agent_dir: &Path,
) -> CommandStatus {
    // The command folder is the instance's to write: every access goes through `Folder`, so a
    // link planted there is never followed out of it.
    let folder = match Folder::open(&host.instance_dir(instance).join("cmd"))
        .and_then(|f| f.sub(Path::new(cid), false))
    {
        Ok(f) => f,
        Err(e) => {
            return CommandStatus::Failed {
                message: format!("open the command folder: {e}"),
                output_tail: String::new(),
            }
        }
    };
    let output = Path::new("output.log");
    let failed = |message: String| CommandStatus::Failed {
        message: crate::ports::cap_text(&message, beneath::TEXT_CAP, false),
        output_tail: beneath::tail(&folder, output, 20),
    };
    // What every `sandbox exec` of this command is given: the instance's posture and cgroups
    // (the same after a reboot: the keeper keeps the instance's id).
    let privileged = host.record(instance).is_ok_and(|r| r.privileged);
    let cgroups = host.cgroups(instance);
    let mut reboots = 0;
    loop {
        let Some(pid) = host.init_pid(instance) else {
            return failed(format!("instance {instance} is not running"));
        };
        let log = match folder.append(output) {
            Ok(f) => f,
            Err(e) => return failed(format!("open the command's output: {e}")),
        };
        let Ok(log2) = log.try_clone() else {
            return failed("duplicate the output handle".into());
        };
        let mut exec = Command::new(&host.agent);
        exec.args(["sandbox", "exec", "--pid", &pid.to_string()]);
        for d in &cgroups {
            exec.arg("--cgroup").arg(d);
        }
        if privileged {
            exec.arg("--privileged");
        }
        // Its own process group, as the instance's keeper: a Ctrl-C at the terminal reaches kiln,
        // which cancels the build, not the command, which would fail it first.
        std::os::unix::process::CommandExt::process_group(&mut exec, 0);
        let status = exec
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status();
        let code = match status {
            Ok(s) => s.code().unwrap_or(-1),
            Err(e) => return failed(format!("start kiln-agent: {e}")),
        };
        if code == REBOOT && reboots < MAX_REBOOTS {
            reboots += 1;
            let rebooted = host.record(instance).and_then(|mut r| {
                host.halt(&r);
                host.boot(&mut r, agent_dir)?;
                host.wait_ready(instance, Duration::from_secs(60))
            });
            if let Err(e) = rebooted {
                return failed(format!("reboot {instance}: {e}"));
            }
            continue;
        }
        if code == 0 {
            return CommandStatus::Success;
        }
        let report = folder
            .read(Path::new("report.json"), REPORT_LIMIT)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        return match report.as_ref().and_then(crate::ports::report_failure) {
            Some((message, output_tail)) => CommandStatus::Failed {
                message,
                output_tail,
            },
            None if code == REBOOT => failed(format!(
                "the command asked for more than {MAX_REBOOTS} reboots"
            )),
            None => failed(format!("kiln-agent exited with code {code}")),
        };
    }
}

impl Commands for LocalCloud {
    fn agent_online<'a>(
        &'a self,
        _region: &'a str,
        instance: &'a InstanceId,
    ) -> PortResult<'a, bool> {
        ready((|| {
            let host = self.host();
            let r = host.record(instance.as_str())?;
            Ok(r.state == InstanceState::Running && host.is_ready(instance.as_str())?)
        })())
    }

    fn send<'a>(
        &'a self,
        _region: &'a str,
        instance: &'a InstanceId,
        plan: &'a CommandPlan,
    ) -> PortResult<'a, CommandId> {
        ready((|| {
            let host = self.host();
            let r = host.record(instance.as_str())?;
            if r.state != InstanceState::Running {
                return Err(StageError::new(
                    ErrorKind::Internal,
                    format!("{instance} is not running"),
                )
                .with_code("InvalidInstanceId"));
            }
            let cid = uuid::Uuid::new_v4().to_string();
            let cmd = Folder::open(&host.instance_dir(instance.as_str()).join("cmd"))
                .map_err(|e| io_error("open the command folder", e))?;
            let dir = cmd
                .sub(Path::new(&cid), true)
                .map_err(|e| io_error("create command", e))?;
            let inside = format!("{}/cmd/{cid}", kiln_agent_mount());
            let mut docs = Vec::new();
            for (i, c) in plan.components.iter().enumerate() {
                let bytes = serde_json::to_vec(&c.document).map_err(|e| io_error("document", e))?;
                dir.write(&Path::new("docs").join(format!("{i}.json")), &bytes)
                    .map_err(|e| io_error("write document", e))?;
                docs.push(format!("{inside}/docs/{i}.json"));
            }
            let params: Vec<_> = plan.components.iter().map(|c| &c.parameters).collect();
            dir.write(
                Path::new("params.json"),
                &serde_json::to_vec(&params).map_err(|e| io_error("parameters", e))?,
            )
            .map_err(|e| io_error("write parameters", e))?;
            let phases: Vec<&str> = plan.phases.iter().map(|p| p.as_str()).collect();
            let args: Vec<String> = vec![
                "run".into(),
                "--documents".into(),
                docs.join(","),
                "--phases".into(),
                phases.join(","),
                "--parameters-file".into(),
                format!("{inside}/params.json"),
                "--work-dir".into(),
                plan.working_directory.clone(),
                "--report".into(),
                format!("{inside}/report.json"),
                "--log-dir".into(),
                format!("{inside}/logs"),
                "--state-file".into(),
                format!("{inside}/state.json"),
            ];
            let agent_dir = self.prepare_agent()?;
            let status = Arc::new(Mutex::new(CommandStatus::InProgress));
            self.commands
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(
                    cid.clone(),
                    Running {
                        status: status.clone(),
                    },
                );
            let id = instance.as_str().to_string();
            let cid2 = cid.clone();
            std::thread::spawn(move || {
                let end = run_to_end(&host, &id, &cid2, &args, &agent_dir);
                let _ = dir.write(
                    Path::new("status.json"),
                    &serde_json::to_vec_pretty(&end).unwrap_or_default(),
                );
                set(&status, end);
            });
            Ok(CommandId(cid))
        })())
    }

    fn status<'a>(
        &'a self,
        _region: &'a str,
        instance: &'a InstanceId,
        command: &'a CommandId,
    ) -> PortResult<'a, CommandStatus> {
        ready((|| {
            if let Some(r) = self
                .commands
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(command.as_str())
            {
                return Ok(r
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone());
            }
            // Started by another kiln process: what it recorded, if it finished.
            let read = Folder::open(&self.host().instance_dir(instance.as_str()).join("cmd"))
                .and_then(|f| {
                    f.read(
                        &Path::new(command.as_str()).join("status.json"),
                        REPORT_LIMIT,
                    )
                });
            match read {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| io_error("command status", e)),
                Err(_) => Err(StageError::new(
                    ErrorKind::Internal,
                    format!("no command {command} on {instance}"),
                )
                .with_code("InvalidCommandId")),
            }
        })())
    }
}

fn kiln_agent_mount() -> &'static str {
    "/.kiln"
}
