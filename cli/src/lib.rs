//! `kiln`, the command line: a thin front end over the `kiln` crate. `run` is the whole program
//! minus the process, so tests drive it in-process and see exactly what a user sees.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub mod local_cmds;
pub mod run;
pub mod serve;
pub mod simulate;
#[cfg(feature = "aws")]
pub mod stack;

/// Text an instance wrote (a command's output, a failure message), made safe to print on a
/// terminal: control characters other than newline and tab (C0, DEL, C1, which start escape
/// sequences, move the cursor or retitle the window) and the bidirectional overrides (which
/// reorder what is shown) are printed as Rust escapes (`\u{1b}`, `\r`), so what a component
/// printed is seen, never obeyed.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Exit codes: 0 success, 1 the job failed, 2 invalid input or usage.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const INVALID: i32 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Golden-image pipelines: build, test and distribute machine images",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The embedded cloud's home (default: $KILN_HOME, or ./.kiln).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check pipeline files and the component documents they use.
    Validate {
        #[arg(required = true, value_name = "PIPELINE.yaml")]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Also check each pipeline's SSM parameters against what this deployed stack's roles
        /// may read and write (its ImageParameterPrefix, read through CloudFormation).
        #[arg(long, value_name = "STACK")]
        stack: Option<String>,
    },
    /// Work with AWSTOE component documents.
    Component {
        #[command(subcommand)]
        command: ComponentCommand,
    },
    /// Print the JSON Schema of a file format, for editors.
    Schema {
        #[arg(value_enum)]
        format: SchemaFormat,
    },
    /// Build, test and distribute an image: the state machine run by kiln's engine.
    Run(run::RunArgs),
    /// A build in AWS before running it: its time (p50/p90), critical path, waits and cost,
    /// from the real state machine and stage code in virtual time over latencies drawn from a
    /// table of published figures.
    Simulate(simulate::SimulateArgs),
    /// The embedded cloud's images.
    Image {
        #[command(subcommand)]
        command: local_cmds::ImageCommand,
    },
    /// Builds recorded in the embedded store.
    Builds {
        #[command(subcommand)]
        command: local_cmds::BuildsCommand,
    },
    /// Apply a pipeline: store its definition (versions are immutable) and enable its schedule
    /// (run by `kiln serve` on this machine).
    Apply {
        #[arg(value_name = "PIPELINE.yaml")]
        pipeline: PathBuf,
        /// Apply to a deployed stack: the table, the bucket, an EventBridge Scheduler schedule
        /// in the pipeline's time zone, a rule for parent-image changes.
        #[arg(long, value_name = "NAME")]
        stack: Option<String>,
    },
    /// Remove a pipeline's schedule and rules (its builds and images stay).
    Delete {
        #[arg(value_name = "PIPELINE")]
        pipeline: String,
        #[arg(long, value_name = "NAME")]
        stack: Option<String>,
    },
    /// Start a build of an applied pipeline in a deployed stack now.
    Start {
        #[arg(value_name = "PIPELINE")]
        pipeline: String,
        #[arg(long, value_name = "NAME")]
        stack: String,
        /// Wait for the execution to end; exit 0 when it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Show a build of a deployed stack (id or unique prefix).
    Status {
        #[arg(value_name = "BUILD")]
        build: String,
        #[arg(long, value_name = "NAME")]
        stack: String,
    },
    /// Stop a build of a deployed stack: its execution stops, cleanup runs, it ends CANCELLED.
    Cancel {
        #[arg(value_name = "BUILD")]
        build: String,
        #[arg(long, value_name = "NAME")]
        stack: String,
    },
    /// Run applied pipelines on their schedules, on this machine (root).
    Serve {
        /// Run what is due now, then exit.
        #[arg(long)]
        once: bool,
        /// Take this time as now (RFC 3339; with --once, to run a schedule ahead of time).
        #[arg(long, value_name = "TIME", requires = "once")]
        now: Option<String>,
        /// List the schedules and exit.
        #[arg(long)]
        list: bool,
    },
    /// Deprecate and delete a pipeline's old images in every region, as its `lifecycle` says.
    Lifecycle {
        #[arg(value_name = "PIPELINE.yaml")]
        pipeline: PathBuf,
        /// Only show what would be deprecated or deleted.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value_t)]
        backend: run::Backend,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Upload kiln-agent to a stack's artifacts bucket (`make deploy` does this).
    UploadAgent {
        #[arg(long, value_name = "BUCKET")]
        artifacts_bucket: String,
        /// The bucket's region (default: AWS_REGION).
        #[arg(long)]
        region: Option<String>,
        /// The binary's architecture.
        #[arg(long, default_value = std::env::consts::ARCH, value_parser = ["x86_64", "aarch64"])]
        arch: String,
        /// The kiln-agent binary (default: the one beside kiln).
        #[arg(value_name = "FILE")]
        agent: Option<PathBuf>,
    },
    /// Clean up what a crashed run left: sandboxes, half-written images, unused blobs.
    Gc {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run and check Step Functions state machines locally.
    Sfn {
        #[command(subcommand)]
        command: SfnCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SfnCommand {
    /// Execute a state machine and print {"status", "output", "error", "cause"} as JSON.
    Exec {
        #[arg(value_name = "DEF.json")]
        definition: PathBuf,
        /// The execution input: JSON text, or @FILE.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Mocked task responses (AWS Step Functions Local MockConfigFile format).
        #[arg(long, value_name = "FILE", requires = "test_case")]
        mock_config: Option<PathBuf>,
        /// The test case of the mock config to use.
        #[arg(long, requires = "mock_config")]
        test_case: Option<String>,
        /// The state machine of the mock config (when several have the test case).
        #[arg(long)]
        state_machine: Option<String>,
        /// Also print the execution history and the billed counts.
        #[arg(long)]
        history: bool,
        /// Wait for Wait states and retry backoff in real time (default: virtual time).
        #[arg(long)]
        real_time: bool,
    },
    /// Check definitions statically: fields, states, transitions, paths, choice rules.
    Validate {
        #[arg(required = true, value_name = "DEF.json")]
        definitions: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ComponentCommand {
    /// Check component documents.
    Validate {
        #[arg(required = true, value_name = "DOC.yaml")]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaFormat {
    /// The pipeline file.
    Pipeline,
    /// AWSTOE component documents.
    Component,
}

/// Runs the command line `args` (including the program name); returns the exit code.
pub fn run<I, T>(args: I, stdout: &mut dyn Write, stderr: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            };
            let text = e.render().ansi().to_string();
            let _ = if e.use_stderr() {
                stderr.write_all(text.as_bytes())
            } else {
                stdout.write_all(text.as_bytes())
            };
            return code;
        }
    };
    match execute(cli, stdout, stderr) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(stderr, "error: {e:#}");
            // A home kiln refuses is the caller's to fix, whichever command opened it.
            let refused_home = e
                .downcast_ref::<kiln::errors::StageError>()
                .is_some_and(|s| s.code.as_deref() == Some(kiln::local::UNSAFE_HOME));
            if refused_home {
                exit::INVALID
            } else {
                exit::FAILED
            }
        }
    }
}

fn execute(cli: Cli, stdout: &mut dyn Write, stderr: &mut dyn Write) -> anyhow::Result<i32> {
    let home = run::home(cli.home.as_deref());
    match cli.command {
        Command::Run(args) => run::run(args, cli.home.as_deref(), stdout, stderr),
        Command::Simulate(args) => simulate::simulate(args, stdout, stderr),
        Command::Image { command } => local_cmds::image(command, &home, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Builds {
            command:
                local_cmds::BuildsCommand::List {
                    pipeline,
                    output,
                    stack: Some(stack),
                },
        } => stack::builds(&stack, pipeline.as_deref(), output, stdout, stderr),
        #[cfg(not(feature = "aws"))]
        Command::Apply { stack: Some(_), .. }
        | Command::Delete { stack: Some(_), .. }
        | Command::Start { .. }
        | Command::Status { .. }
        | Command::Cancel { .. }
        | Command::Builds {
            command: local_cmds::BuildsCommand::List { stack: Some(_), .. },
        } => {
            writeln!(
                stderr,
                "--stack: this kiln was built without the AWS backend (cargo feature `aws`)"
            )?;
            Ok(exit::INVALID)
        }
        Command::Builds { command } => local_cmds::builds(command, &home, stdout, stderr),
        Command::Gc { dry_run } => local_cmds::gc(&home, dry_run, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Apply {
            pipeline,
            stack: Some(stack),
        } => stack::apply(&pipeline, &stack, stdout, stderr),
        Command::Apply {
            pipeline,
            stack: None,
        } => serve::apply(&pipeline, &open_local(&home)?, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Delete {
            pipeline,
            stack: Some(stack),
        } => stack::delete(&pipeline, &stack, stdout, stderr),
        Command::Delete {
            pipeline,
            stack: None,
        } => serve::delete(&pipeline, &open_local(&home)?, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Start {
            pipeline,
            stack,
            wait,
        } => stack::start(&pipeline, &stack, wait, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Status { build, stack } => stack::status(&build, &stack, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Cancel { build, stack } => stack::cancel(&build, &stack, stdout, stderr),
        Command::Serve { once, now, list } => {
            let now = match now.map(|t| chrono::DateTime::parse_from_rfc3339(&t)) {
                Some(Ok(t)) => Some(t.with_timezone(&chrono::Utc)),
                Some(Err(e)) => {
                    writeln!(stderr, "--now: not an RFC 3339 time: {e}")?;
                    return Ok(exit::INVALID);
                }
                None => None,
            };
            serve::serve(&home, once, now, list, stdout, stderr)
        }
        Command::Lifecycle {
            pipeline,
            dry_run,
            backend,
            output,
        } => run::lifecycle(&pipeline, dry_run, backend, output, &home, stdout, stderr),
        Command::UploadAgent {
            artifacts_bucket,
            region,
            arch,
            agent,
        } => run::upload_agent(&artifacts_bucket, region, &arch, agent, stdout, stderr),
        #[cfg(feature = "aws")]
        Command::Validate {
            files,
            output,
            stack: Some(stack),
        } => stack::validate(&files, &stack, output, stdout, stderr),
        #[cfg(not(feature = "aws"))]
        Command::Validate { stack: Some(_), .. } => {
            writeln!(
                stderr,
                "--stack: this kiln was built without the AWS backend (cargo feature `aws`)"
            )?;
            Ok(exit::INVALID)
        }
        Command::Validate { files, output, .. } => {
            let results = kiln::report::check_pipelines(&files);
            let ok = kiln::report::write(&results, output == Output::Json, stdout, stderr)?;
            Ok(if ok { exit::OK } else { exit::INVALID })
        }
        Command::Component {
            command: ComponentCommand::Validate { files, output },
        } => {
            let results = kiln::report::check_components(&files);
            let ok = kiln::report::write(&results, output == Output::Json, stdout, stderr)?;
            Ok(if ok { exit::OK } else { exit::INVALID })
        }
        Command::Sfn { command } => sfn(command, stdout, stderr),
        Command::Schema { format } => {
            let schema = match format {
                SchemaFormat::Pipeline => schemars::schema_for!(kiln::model::Pipeline),
                SchemaFormat::Component => schemars::schema_for!(kiln::component::Document),
            };
            serde_json::to_writer_pretty(&mut *stdout, &schema)?;
            writeln!(stdout)?;
            Ok(exit::OK)
        }
    }
}

fn open_local(home: &std::path::Path) -> anyhow::Result<kiln::local::LocalCloud> {
    let agent = run::agent_binary().unwrap_or_else(|_| PathBuf::from("kiln-agent"));
    Ok(kiln::local::LocalCloud::open(home, &agent)?)
}

/// Reads a definition file; problems are usage errors (exit 2).
fn read_definition(
    path: &std::path::Path,
) -> Result<(serde_json::Value, kiln::engine::definition::Machine), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}:{}:{}: invalid JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let machine = kiln::engine::definition::parse(&json).map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok((json, machine))
}

fn sfn(command: SfnCommand, stdout: &mut dyn Write, stderr: &mut dyn Write) -> anyhow::Result<i32> {
    match command {
        SfnCommand::Validate { definitions } => {
            let mut ok = true;
            for d in &definitions {
                match read_definition(d) {
                    Ok(_) => writeln!(stdout, "ok  {}", d.display())?,
                    Err(e) => {
                        ok = false;
                        writeln!(stderr, "{e}")?;
                    }
                }
            }
            Ok(if ok { exit::OK } else { exit::INVALID })
        }
        SfnCommand::Exec {
            definition,
            input,
            mock_config,
            test_case,
            state_machine,
            history,
            real_time,
        } => {
            let usage = |stderr: &mut dyn Write, m: String| -> anyhow::Result<i32> {
                writeln!(stderr, "{m}")?;
                Ok(exit::INVALID)
            };
            let (_, machine) = match read_definition(&definition) {
                Ok(m) => m,
                Err(e) => return usage(stderr, e),
            };
            let input_text = match input.strip_prefix('@') {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => t,
                    Err(e) => return usage(stderr, format!("--input @{f}: {e}")),
                },
                None => input,
            };
            let input: serde_json::Value = match serde_json::from_str(&input_text) {
                Ok(v) => v,
                Err(e) => return usage(stderr, format!("--input is not JSON: {e}")),
            };
            let tasks: std::sync::Arc<dyn kiln::engine::Tasks> = match (mock_config, test_case) {
                (Some(f), Some(case)) => {
                    let text = match std::fs::read_to_string(&f) {
                        Ok(t) => t,
                        Err(e) => {
                            return usage(stderr, format!("--mock-config {}: {e}", f.display()))
                        }
                    };
                    match kiln::engine::mock::MockConfig::parse(&text)
                        .and_then(|c| c.test_case(state_machine.as_deref(), &case))
                    {
                        Ok(t) => std::sync::Arc::new(t),
                        Err(e) => {
                            return usage(stderr, format!("--mock-config {}: {e}", f.display()))
                        }
                    }
                }
                _ => std::sync::Arc::new(kiln::engine::NoTasks(
                    "; pass --mock-config and --test-case to mock it",
                )),
            };
            let clock: std::sync::Arc<dyn kiln::engine::clock::Clock> = if real_time {
                std::sync::Arc::new(kiln::engine::clock::RealClock)
            } else {
                std::sync::Arc::new(kiln::engine::clock::VirtualClock::default())
            };
            let engine = kiln::engine::Engine::new(tasks, clock, !real_time);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(engine.run(&machine, input, "kiln-sfn-exec"));
            let mut out = serde_json::to_value(&outcome)?;
            if history {
                out["stateTransitions"] = serde_json::json!(outcome.state_transitions());
                out["taskInvocations"] = serde_json::json!(outcome.task_invocations());
                out["history"] = serde_json::to_value(&outcome.history)?;
            }
            writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::terminal_safe;

    #[test]
    fn text_from_an_instance_is_shown_on_a_terminal_never_obeyed() {
        // Plain text, newlines, tabs and non-ASCII letters pass as they are (no copy).
        let plain = "line one\n\tline two: café ✓";
        assert!(matches!(
            terminal_safe(plain),
            std::borrow::Cow::Borrowed(_)
        ));
        // Escape sequences (OSC title, CSI clear, C1 CSI), carriage return, bell, DEL and a
        // right-to-left override are printed as escapes.
        let hostile = "a\u{1b}]0;owned\u{7}b\u{1b}[2Jc\u{9b}31md\re\u{7f}f\u{202e}g";
        let shown = terminal_safe(hostile);
        assert_eq!(
            shown,
            "a\\u{1b}]0;owned\\u{7}b\\u{1b}[2Jc\\u{9b}31md\\re\\u{7f}f\\u{202e}g"
        );
        assert!(shown.chars().all(|c| !c.is_control() && c != '\u{202e}'));
    }
}
