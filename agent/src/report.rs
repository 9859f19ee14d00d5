//! The run report, modelled on AWSTOE's detailedoutput.json: documents → phases → steps, each with
//! status, attempts, times, exit code, output tails, outputs and the failure message.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Failed,
    /// A failure that `onFailure: Ignore` turned into success.
    Ignored,
    /// `if` was false, or the run stopped before this point.
    Skipped,
    /// The step asked for a reboot; the run resumes after it.
    Reboot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub run_id: String,
    pub status: Status,
    pub start_time: String,
    pub end_time: String,
    pub duration_seconds: f64,
    /// How many times the run was resumed after a reboot.
    pub reboots: u32,
    pub documents: Vec<DocumentReport>,
    /// The first failure that made the run fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentReport {
    pub name: String,
    pub path: String,
    pub status: Status,
    pub phases: Vec<PhaseReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseReport {
    pub name: String,
    pub status: Status,
    pub steps: Vec<StepReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub name: String,
    pub action: String,
    pub status: Status,
    pub attempts: u32,
    pub iterations: u32,
    pub start_time: String,
    pub end_time: String,
    pub duration_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub outputs: Json,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// Phases run by ExecuteDocument.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nested: Vec<PhaseReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub document: String,
    pub phase: String,
    pub step: String,
    pub message: String,
    pub output_tail: String,
}

/// Now, as the report writes times.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn mark(s: Status) -> &'static str {
    match s {
        Status::Success => "ok    ",
        Status::Failed => "FAILED",
        Status::Ignored => "ignored",
        Status::Skipped => "skipped",
        Status::Reboot => "reboot",
    }
}

/// A readable summary for the console.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    for d in &report.documents {
        out.push_str(&format!("{} {}\n", mark(d.status), d.name));
        for p in &d.phases {
            for s in &p.steps {
                out.push_str(&format!(
                    "  {} {}/{} ({}, {:.2}s",
                    mark(s.status),
                    p.name,
                    s.name,
                    s.action,
                    s.duration_seconds
                ));
                if s.attempts > 1 {
                    out.push_str(&format!(", {} attempts", s.attempts));
                }
                if s.iterations > 1 {
                    out.push_str(&format!(", {} iterations", s.iterations));
                }
                out.push_str(")\n");
                if let Some(m) = &s.failure_message {
                    out.push_str(&format!("      {m}\n"));
                }
            }
        }
    }
    let verdict = match report.status {
        Status::Success | Status::Ignored | Status::Skipped => "succeeded",
        Status::Failed => "FAILED",
        Status::Reboot => "needs a reboot; run the same command again after it",
    };
    out.push_str(&format!(
        "run {verdict} in {:.2}s\n",
        report.duration_seconds
    ));
    if let Some(f) = &report.failure {
        out.push_str(&format!(
            "failed at {}: {}/{}: {}\n",
            f.document, f.phase, f.step, f.message
        ));
        if !f.output_tail.trim().is_empty() {
            out.push_str("--- output (tail) ---\n");
            out.push_str(f.output_tail.trim_end());
            out.push('\n');
        }
    }
    out
}
