//! The `kiln-agent` command line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln::component::PhaseName;

use crate::runner::{self, DocSpec, Options, RunOutcome};

/// Exit codes, as AWSTOE and SSM Run Command read them.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const INVALID: i32 = 2;
    pub const REBOOT: i32 = crate::actions::REBOOT_EXIT_CODE;
}

#[derive(Debug, Parser)]
#[command(
    name = "kiln-agent",
    version,
    about = "An open, AWSTOE-compatible component runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Check component documents; exit 0 when all are valid, 2 when not.
    Validate {
        #[arg(required = true, value_name = "DOC.yaml")]
        documents: Vec<PathBuf>,
        /// Print a JSON report on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run component documents. Exit 0 success, 1 a step failed, 194 reboot and run again, 2
    /// invalid documents or usage.
    Run {
        /// Documents, in the order they run (comma-separated or repeated).
        #[arg(long, required = true, value_delimiter = ',')]
        documents: Vec<PathBuf>,
        /// Phases to run, in document order (default: all).
        #[arg(long, value_delimiter = ',', default_value = "build,validate,test")]
        phases: Vec<String>,
        /// NAME=VALUE for every document that declares NAME (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        parameters: Vec<String>,
        /// JSON list with one object of parameter values per document, in --documents order.
        #[arg(long, value_name = "FILE")]
        parameters_file: Option<PathBuf>,
        /// Write the JSON report here.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Where steps run (default: the current folder).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Progress kept across a reboot.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/var/lib/kiln-agent/state.json"
        )]
        state_file: PathBuf,
        /// Write each step's full output here.
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
        /// Do not stream step output to the console.
        #[arg(long)]
        quiet: bool,
        /// After every phase succeeded, remove what these sanitize items name (comma-separated)
        /// and report it as the document `kiln-sanitize`.
        #[arg(long, value_delimiter = ',', value_parser = kiln::model::pipeline::SanitizeItem::parse)]
        sanitize: Vec<kiln::model::pipeline::SanitizeItem>,
        /// Write what sanitizing removed (paths and SHA-256, no content) here.
        #[arg(long, value_name = "FILE")]
        sanitize_record: Option<PathBuf>,
        /// Before any document: check this instance carries none of the files the builder's
        /// record lists, reported as the test `kiln-clean-image`.
        #[arg(long, value_name = "RECORD")]
        verify_clean: Option<PathBuf>,
        /// The sanitize items the check covers (default: none, only `--verify-absent`).
        #[arg(long, value_delimiter = ',', value_parser = kiln::model::pipeline::SanitizeItem::parse)]
        verify_items: Vec<kiln::model::pipeline::SanitizeItem>,
        /// Paths that must not exist (kiln's folders on the builder), comma-separated.
        #[arg(long, value_delimiter = ',')]
        verify_absent: Vec<String>,
        /// The root the sanitize step and the check work in.
        #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// The sandbox side of kiln's embedded instances (started by kiln, not by hand).
    #[command(hide = true)]
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Keep an instance: namespaces, overlay root, pivot_root, then init as its PID 1.
    Boot {
        #[arg(long, value_name = "DIR")]
        instance_dir: PathBuf,
        /// Image layers, topmost first.
        #[arg(long, value_delimiter = ':')]
        lower: Vec<PathBuf>,
        #[arg(long)]
        hostname: String,
        /// private (its own namespace, out through slirp4netns), host or none.
        #[arg(long, value_parser = kiln::model::pipeline::Network::parse, default_value = "private")]
        network: kiln::model::pipeline::Network,
        #[arg(long, value_name = "DIR")]
        agent_dir: PathBuf,
        /// No posture: every capability, no seccomp filter, /proc as the host has it.
        #[arg(long)]
        privileged: bool,
        /// The most processes the instance may run.
        #[arg(long, default_value_t = 4096)]
        pids_max: u64,
        /// The most memory (bytes) the instance may use.
        #[arg(long, default_value_t = 4 << 30)]
        memory_max: u64,
        /// No cgroup: the pipeline's explicit `infrastructure.limits: none`.
        #[arg(long, conflicts_with_all = ["pids_max", "memory_max"])]
        no_limits: bool,
        /// A destination a private network lets through (repeatable): CIDR or host:port.
        #[arg(long, value_name = "DEST")]
        allow: Vec<String>,
    },
    /// PID 1 inside an instance.
    Init {
        #[arg(long)]
        privileged: bool,
        /// The instance's root, to mount /proc in and pivot into.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// slirp4netns for the network namespace of `target`, once a byte arrives on stdin.
    Usernet {
        #[arg(long)]
        target: u32,
    },
    /// Run the agent inside the instance whose init has host PID `pid`.
    Exec {
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value = "/")]
        cwd: String,
        /// A cgroup folder of the instance to join first (repeatable).
        #[arg(long, value_name = "DIR")]
        cgroup: Vec<PathBuf>,
        #[arg(long)]
        privileged: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Runs the command line; returns the exit code.
pub fn run<I, T>(args: I, stdout: &mut dyn Write, stderr: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                stderr.write_all(text.as_bytes())
            } else {
                stdout.write_all(text.as_bytes())
            };
            return if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            };
        }
    };
    match cli.command {
        Command::Sandbox { command } => {
            let result = match command {
                SandboxCommand::Boot {
                    instance_dir,
                    lower,
                    hostname,
                    network,
                    agent_dir,
                    privileged,
                    pids_max,
                    memory_max,
                    no_limits,
                    allow,
                } => crate::sandbox::boot(&crate::sandbox::Boot {
                    instance_dir,
                    lower,
                    hostname,
                    network,
                    agent_dir,
                    privileged,
                    allow,
                    limits: (!no_limits).then_some(crate::sandbox::Limits {
                        pids: pids_max,
                        memory: memory_max,
                    }),
                }),
                SandboxCommand::Usernet { target } => crate::usernet::helper(target),
                SandboxCommand::Init { privileged, root } => {
                    crate::sandbox::init(privileged, root.as_deref())
                }
                SandboxCommand::Exec {
                    pid,
                    cwd,
                    cgroup,
                    privileged,
                    args,
                } => crate::sandbox::exec(pid, &cwd, &args, &cgroup, privileged),
            };
            match result {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(stderr, "kiln-agent sandbox: {e}");
                    exit::FAILED
                }
            }
        }
        Command::Validate { documents, json } => {
            let results = kiln::report::check_components(&documents);
            match kiln::report::write(&results, json, stdout, stderr) {
                Ok(true) => exit::OK,
                Ok(false) => exit::INVALID,
                Err(_) => exit::FAILED,
            }
        }
        Command::Run {
            documents,
            phases,
            parameters,
            parameters_file,
            report,
            work_dir,
            state_file,
            log_dir,
            quiet,
            sanitize,
            sanitize_record,
            verify_clean,
            verify_items,
            verify_absent,
            root,
        } => {
            let mut plan = match plan(&documents, &phases, &parameters, parameters_file.as_deref())
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = writeln!(stderr, "{}", e.trim_end());
                    return exit::INVALID;
                }
            };
            let work_dir = work_dir
                .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")));
            if let Err(e) = std::fs::create_dir_all(&work_dir) {
                let _ = writeln!(
                    stderr,
                    "cannot create the work folder {}: {e}",
                    work_dir.display()
                );
                return exit::FAILED;
            }
            // Before any secret is read: folders another user controls are refused.
            let state_dir = state_file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let scripts = match crate::exec::check_folder(&work_dir, "work folder")
                .and_then(|()| crate::exec::script_base(state_dir))
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = writeln!(stderr, "kiln-agent: {e}");
                    return exit::INVALID;
                }
            };
            // `{{ ssm-secure:/name }}` values: read now, kept in memory, masked in what is written.
            let mut secrets = Vec::new();
            for spec in &mut plan.0 {
                for (name, value) in spec.parameters.iter_mut() {
                    let Some(reference) =
                        kiln::component::secure_reference(value).map(str::to_string)
                    else {
                        continue;
                    };
                    match crate::secrets::get_secure(&reference) {
                        Ok(secret) => {
                            // As written in text, and as the JSON report escapes it.
                            let escaped = serde_json::to_string(&secret).unwrap_or_default();
                            secrets.push(escaped.trim_matches('"').to_string());
                            secrets.push(secret.clone());
                            *value = secret;
                        }
                        Err(e) => {
                            let _ = writeln!(
                                stderr,
                                "parameter {name} of {}: {e}",
                                spec.path.display()
                            );
                            return exit::FAILED;
                        }
                    }
                }
            }
            let log_dir_for_mask = log_dir.clone();
            let opts = Options {
                phases: plan.1.clone(),
                work_dir,
                state_file,
                scripts,
                log_dir,
                echo: !quiet,
            };
            // The image check first: a dirty image fails the test before any test runs.
            let check = match verify_clean {
                None => None,
                Some(path) => {
                    let record = std::fs::read(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
                    let record: crate::clean::Record = match record {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = writeln!(
                                stderr,
                                "--verify-clean {}: not a sanitize record: {e}",
                                path.display()
                            );
                            return exit::INVALID;
                        }
                    };
                    Some(crate::clean::verify(
                        &root,
                        &verify_items,
                        &record,
                        &verify_absent,
                    ))
                }
            };
            let (mut outcome, mut rep) = match &check {
                Some((doc, Some(failure))) => {
                    let mut rep = runner::empty_report(RunOutcome::Failed);
                    rep.failure = Some(failure.clone());
                    rep.documents.push(doc.clone());
                    (RunOutcome::Failed, rep)
                }
                _ => runner::run(&plan.0, &opts),
            };
            if let Some((doc, None)) = check {
                rep.documents.insert(0, doc);
            }
            if outcome == RunOutcome::Success && (!sanitize.is_empty() || sanitize_record.is_some())
            {
                let (record, doc, failure) = crate::clean::sanitize_report(&root, &sanitize);
                rep.documents.push(doc);
                let written = sanitize_record.map(|path| {
                    serde_json::to_vec_pretty(&record)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            std::fs::write(&path, b).map_err(|e| format!("{}: {e}", path.display()))
                        })
                });
                let failure = failure.or_else(|| match written {
                    Some(Err(e)) => Some(crate::report::Failure {
                        document: crate::clean::SANITIZE_NAME.into(),
                        phase: "build".into(),
                        step: "record".into(),
                        message: format!("cannot write the sanitize record {e}"),
                        output_tail: String::new(),
                    }),
                    _ => None,
                });
                if let Some(f) = failure {
                    rep.status = crate::report::Status::Failed;
                    rep.failure = Some(f);
                    outcome = RunOutcome::Failed;
                }
            }
            if !secrets.is_empty() {
                if let Ok(text) = serde_json::to_string(&rep) {
                    if let Ok(masked) = serde_json::from_str(&crate::secrets::mask(&text, &secrets))
                    {
                        rep = masked;
                    }
                }
                if let Some(dir) = &log_dir_for_mask {
                    crate::secrets::mask_files(dir, &secrets);
                }
            }
            if let Some(path) = report {
                let written = serde_json::to_vec_pretty(&rep)
                    .map_err(|e| e.to_string())
                    .and_then(|b| std::fs::write(&path, b).map_err(|e| e.to_string()));
                if let Err(e) = written {
                    let _ = writeln!(stderr, "cannot write the report to {}: {e}", path.display());
                }
            }
            let _ = write!(stdout, "{}", crate::report::summary(&rep));
            match outcome {
                RunOutcome::Success => exit::OK,
                RunOutcome::Failed => exit::FAILED,
                RunOutcome::Reboot => exit::REBOOT,
            }
        }
    }
}

/// Reads and validates everything a run needs before any step runs.
fn plan(
    documents: &[PathBuf],
    phases: &[String],
    parameters: &[String],
    parameters_file: Option<&std::path::Path>,
) -> Result<(Vec<DocSpec>, Vec<PhaseName>), String> {
    let mut wanted = Vec::new();
    for p in phases {
        match p.trim() {
            "build" => wanted.push(PhaseName::Build),
            "validate" => wanted.push(PhaseName::Validate),
            "test" => wanted.push(PhaseName::Test),
            other => {
                return Err(format!(
                    "--phases: unknown phase `{other}` (allowed: build, validate, test)"
                ))
            }
        }
    }
    let mut global = BTreeMap::new();
    for p in parameters {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--parameters: `{p}` is not NAME=VALUE"))?;
        global.insert(k.trim().to_string(), v.to_string());
    }
    let per_doc: Vec<BTreeMap<String, String>> = match parameters_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("--parameters-file {}: {e}", f.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("--parameters-file {}: expected a JSON list of {{\"name\": \"value\"}} objects: {e}", f.display()))?
        }
        None => Vec::new(),
    };
    if per_doc.len() > documents.len() {
        return Err(format!(
            "--parameters-file has {} entries for {} documents",
            per_doc.len(),
            documents.len()
        ));
    }
    let mut specs = Vec::new();
    let mut problems = kiln::diag::Diagnostics::default();
    for (i, path) in documents.iter().enumerate() {
        match kiln::component::load_file(path) {
            Ok(loaded) => {
                let declared: Vec<&str> = loaded.document.parameter_names().collect();
                let mut params: BTreeMap<String, String> = global
                    .iter()
                    .filter(|(k, _)| declared.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (k, v) in per_doc.get(i).into_iter().flatten() {
                    if !declared.contains(&k.as_str()) {
                        return Err(format!(
                            "--parameters-file: {} declares no parameter `{k}`",
                            path.display()
                        ));
                    }
                    params.insert(k.clone(), v.clone());
                }
                specs.push(DocSpec {
                    path: path.clone(),
                    loaded,
                    parameters: params,
                });
            }
            Err(d) => problems.extend(d),
        }
    }
    if !problems.is_empty() {
        return Err(problems.to_string());
    }
    for k in global.keys() {
        if !specs
            .iter()
            .any(|s| s.loaded.document.parameter(k).is_some())
        {
            return Err(format!("--parameters: no document declares `{k}`"));
        }
    }
    for s in &specs {
        runner::resolve_parameters(
            &s.loaded.document,
            &s.parameters,
            &s.path.display().to_string(),
        )?;
    }
    Ok((specs, wanted))
}
