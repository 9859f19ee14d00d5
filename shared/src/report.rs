//! How validation results are shown, shared by `kiln` and `kiln-agent`: one line per problem
//! (`file:line:col: path: message`) on stderr and a summary, or one JSON document on stdout.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::diag::{Diagnostic, Diagnostics};

/// The result of checking one file; `summary` describes a valid file in a few words.
#[derive(Debug)]
pub struct Checked {
    pub file: PathBuf,
    pub outcome: Result<String, Diagnostics>,
}

#[derive(Serialize)]
struct JsonFile<'a> {
    file: &'a PathBuf,
    valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    valid: bool,
    files: Vec<JsonFile<'a>>,
    errors: Vec<&'a Diagnostic>,
}

/// Writes the report; returns true when every file was valid.
pub fn write(
    results: &[Checked],
    json: bool,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<bool> {
    let valid = results.iter().all(|r| r.outcome.is_ok());
    if json {
        let report = JsonReport {
            valid,
            files: results
                .iter()
                .map(|r| JsonFile {
                    file: &r.file,
                    valid: r.outcome.is_ok(),
                    summary: r.outcome.as_ref().ok().map(String::as_str),
                })
                .collect(),
            errors: results
                .iter()
                .filter_map(|r| r.outcome.as_ref().err())
                .flat_map(|d| d.0.iter())
                .collect(),
        };
        serde_json::to_writer_pretty(&mut *stdout, &report)?;
        writeln!(stdout)?;
        return Ok(valid);
    }
    let mut problems = 0;
    for r in results {
        match &r.outcome {
            Ok(summary) => writeln!(stdout, "ok  {}: {summary}", r.file.display())?,
            Err(d) => {
                problems += d.0.len();
                write!(stderr, "{d}")?;
            }
        }
    }
    if !valid {
        let bad = results.iter().filter(|r| r.outcome.is_err()).count();
        writeln!(
            stderr,
            "{bad} of {} file{} invalid, {problems} problem{}",
            results.len(),
            if results.len() == 1 { "" } else { "s" },
            if problems == 1 { "" } else { "s" }
        )?;
    }
    Ok(valid)
}

/// Checks component documents, as `kiln component validate` and `kiln-agent validate` do.
pub fn check_components(files: &[PathBuf]) -> Vec<Checked> {
    files
        .iter()
        .map(|f| Checked {
            file: f.clone(),
            outcome: crate::component::load_file(f).map(|l| {
                let steps: usize = l.document.phases.iter().map(|p| p.steps.len()).sum();
                let phases: Vec<&str> = l.document.phases.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "component `{}`, phases {}, {steps} step{}",
                    l.document.name.as_deref().unwrap_or("(unnamed)"),
                    phases.join("+"),
                    if steps == 1 { "" } else { "s" }
                )
            }),
        })
        .collect()
}

/// Checks pipeline files, as `kiln validate` does.
pub fn check_pipelines(files: &[PathBuf]) -> Vec<Checked> {
    check_pipelines_with(files, crate::model::load)
}

/// [`check_pipelines`], and each pipeline's SSM parameters against what the deployed stack
/// `grants` describes lets its roles read and write.
pub fn check_pipelines_for_stack(
    files: &[PathBuf],
    grants: &crate::model::load::StackGrants,
) -> Vec<Checked> {
    check_pipelines_with(files, |f| crate::model::load::load_for_stack(f, grants))
}

fn check_pipelines_with(
    files: &[PathBuf],
    load: impl Fn(&std::path::Path) -> Result<crate::model::LoadedPipeline, Diagnostics>,
) -> Vec<Checked> {
    files
        .iter()
        .map(|f| Checked {
            file: f.clone(),
            outcome: load(f).map(|l| {
                let p = &l.pipeline;
                let regions: Vec<&str> = p.distribution.iter().map(|d| d.region.as_str()).collect();
                format!(
                    "pipeline `{}` {}: {} component{}, {} test{}, regions {}",
                    p.name,
                    p.version,
                    l.components.len(),
                    if l.components.len() == 1 { "" } else { "s" },
                    l.tests.len(),
                    if l.tests.len() == 1 { "" } else { "s" },
                    regions.join(", ")
                )
            }),
        })
        .collect()
}
