//! `kiln`, the command line: a thin front end over the `kiln` crate. `run` is the whole program
//! minus the process, so tests drive it in-process and see exactly what a user sees.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
            exit::FAILED
        }
    }
}

fn execute(cli: Cli, stdout: &mut dyn Write, stderr: &mut dyn Write) -> anyhow::Result<i32> {
    match cli.command {
        Command::Validate { files, output } => {
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
