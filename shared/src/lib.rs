//! kiln: golden-image pipelines. All logic lives here; the CLI, the agent and the Lambda
//! functions are thin front ends over this crate.

#[cfg(feature = "aws")]
pub mod aws;
pub mod component;
pub mod confine;
pub mod diag;
pub mod digest;
#[cfg(feature = "engine")]
pub mod engine;
pub mod errors;
#[cfg(feature = "engine")]
pub mod execution;
#[cfg(feature = "lambda")]
pub mod lambda;
#[cfg(feature = "local")]
pub mod local;
pub mod model;
pub mod ports;
pub mod relpath;
pub mod report;
#[cfg(feature = "engine")]
pub mod simulate;
pub mod stages;
pub mod typed;
pub mod userns;
pub mod yaml;

use std::path::Path;

use diag::{Diagnostic, Diagnostics};

/// The version of kiln, and of the component runner it ships (part of every fingerprint).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Reads a source file, turning an I/O failure into a diagnostic for that file.
pub fn read_source(path: &Path) -> Result<String, Diagnostics> {
    std::fs::read_to_string(path).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read file: {e}"),
            allowed: Vec::new(),
        }])
    })
}

/// Parses YAML text, turning syntax problems into diagnostics for `path`.
pub fn parse_source(path: &Path, text: &str) -> Result<yaml::Node, Diagnostics> {
    yaml::parse(text).map_err(|problems| {
        Diagnostics(
            problems
                .into_iter()
                .map(|p| Diagnostic {
                    file: path.to_path_buf(),
                    line: p.mark.line,
                    column: p.mark.column,
                    path: String::new(),
                    message: format!("YAML: {}", p.message),
                    allowed: Vec::new(),
                })
                .collect(),
        )
    })
}
