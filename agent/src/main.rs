//! `kiln-agent`: runs AWSTOE component documents on an instance. This build validates documents;
//! every command shares the document model with `kiln`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate { documents, json } => {
            let results = kiln::report::check_components(&documents);
            match kiln::report::write(
                &results,
                json,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            ) {
                Ok(true) => 0,
                Ok(false) => 2,
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
