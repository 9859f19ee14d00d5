//! Errors as Step Functions names them: an error name and a cause, with the rules for which
//! names a Retry or Catch matches.

use serde::{Deserialize, Serialize};

/// The longest Cause an error keeps, in characters: what Step Functions accepts for a task's
/// failure (`SendTaskFailure`, a TaskFailed event). A longer one is cut, so that a state's error
/// output stays far under the 256 KiB data limit that no catcher handles.
pub const MAX_CAUSE_CHARS: usize = 32_768;

/// `cause`, cut to [`MAX_CAUSE_CHARS`] characters.
fn capped(mut cause: String) -> String {
    if let Some((at, _)) = cause.char_indices().nth(MAX_CAUSE_CHARS) {
        cause.truncate(at);
    }
    cause
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateError {
    pub error: String,
    pub cause: String,
    /// A Fail state without Error (or Cause): AWS records none — null, not "".
    #[serde(skip)]
    pub unset: (bool, bool),
    /// Ends the execution whatever the states' Retry and Catch say (the execution's own
    /// TimeoutSeconds).
    #[serde(skip)]
    pub terminal: bool,
}

impl StateError {
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> Self {
        StateError {
            error: error.into(),
            cause: capped(cause.into()),
            unset: (false, false),
            terminal: false,
        }
    }

    /// The execution ran past its TimeoutSeconds: TIMED_OUT, caught by nothing.
    pub fn execution_timed_out(seconds: f64) -> Self {
        StateError {
            terminal: true,
            ..StateError::new(
                "States.Timeout",
                format!("The execution exceeded its TimeoutSeconds of {seconds} seconds"),
            )
        }
    }

    /// What a Fail state raises: its Error and Cause, either of which may be absent.
    pub fn fail_state(error: Option<String>, cause: Option<String>) -> Self {
        StateError {
            unset: (error.is_none(), cause.is_none()),
            error: error.unwrap_or_default(),
            cause: capped(cause.unwrap_or_default()),
            terminal: false,
        }
    }

    /// The error name as an execution reports it (None when a Fail state gave none).
    pub fn reported_error(&self) -> Option<String> {
        (!self.unset.0).then(|| self.error.clone())
    }

    /// The cause as an execution reports it (None when a Fail state gave none).
    pub fn reported_cause(&self) -> Option<String> {
        (!self.unset.1).then(|| self.cause.clone())
    }

    /// The error a Lambda function's failure becomes: `errorType` is the Error, the error
    /// payload (as JSON text) is the Cause.
    pub fn from_lambda(error_type: &str, message: &str) -> Self {
        // The message is shortened rather than the payload cut, so the Cause stays JSON.
        let mut message: String = message.chars().take(MAX_CAUSE_CHARS).collect();
        loop {
            let payload =
                serde_json::json!({ "errorType": error_type, "errorMessage": message }).to_string();
            let length = payload.chars().count();
            if length <= MAX_CAUSE_CHARS || message.is_empty() {
                return StateError::new(error_type, payload);
            }
            // In proportion (escapes make a character up to six), and always shorter.
            let count = message.chars().count();
            let keep = (count * MAX_CAUSE_CHARS / length).min(count - 1);
            message = message.chars().take(keep).collect();
        }
    }

    /// This error with `cause` (cut as every Cause is).
    pub fn with_cause(mut self, cause: String) -> Self {
        self.cause = capped(cause);
        self
    }

    /// Whether a Retry or Catch with `names` handles this error.
    pub fn matches(&self, names: &[String], in_task: bool) -> bool {
        if self.error == "States.Runtime" || self.terminal {
            return false;
        }
        names.iter().any(|n| match n.as_str() {
            // AWS documents that States.ALL does not catch States.DataLimitExceeded; its
            // recorded executions show a Task's oversized result caught by States.ALL, so the
            // exception holds for the other states only.
            "States.ALL" => self.error != "States.DataLimitExceeded" || in_task,
            "States.TaskFailed" => {
                in_task
                    && self.error != "States.Timeout"
                    && self.error != "States.DataLimitExceeded"
            }
            other => other == self.error,
        })
    }
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.cause)
    }
}

impl std::error::Error for StateError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_of_100_kb_is_cut_to_32768_characters_as_aws_cuts_task_failures() {
        // GIVEN causes of 100,000 characters, one- and two-byte
        for unit in ["x", "é"] {
            let long = unit.repeat(100_000);
            // WHEN a task fails with it, a Fail state raises it, or a Lambda error carries it
            let task = StateError::new("Kiln.ComponentFailed", long.clone());
            let fail = StateError::fail_state(Some("E".into()), Some(long.clone()));
            let lambda = StateError::from_lambda("Kiln.ComponentFailed", &long);
            // THEN each Cause is 32,768 characters, the start kept
            assert_eq!(task.cause.chars().count(), MAX_CAUSE_CHARS);
            assert!(long.starts_with(&task.cause));
            assert_eq!(fail.cause.chars().count(), MAX_CAUSE_CHARS);
            assert_eq!(lambda.cause.chars().count(), MAX_CAUSE_CHARS);
            // AND the Lambda error's Cause is still its JSON payload
            let payload: serde_json::Value = serde_json::from_str(&lambda.cause).expect("JSON");
            assert_eq!(payload["errorType"], "Kiln.ComponentFailed");
        }
        // AND a message of characters JSON escapes keeps what fits, not nothing
        let escaped = StateError::from_lambda("Kiln.ComponentFailed", &"\0".repeat(100_000));
        let payload: serde_json::Value = serde_json::from_str(&escaped.cause).expect("JSON");
        let kept = payload["errorMessage"].as_str().expect("message").len();
        assert!(escaped.cause.chars().count() <= MAX_CAUSE_CHARS);
        assert!(kept > 4000, "{kept} characters kept");
        // AND a short cause is kept whole
        assert_eq!(StateError::new("E", "short").cause, "short");
    }
}
