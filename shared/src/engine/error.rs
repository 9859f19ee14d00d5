//! Errors as Step Functions names them: an error name and a cause, with the rules for which
//! names a Retry or Catch matches.

use serde::{Deserialize, Serialize};

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
            cause: cause.into(),
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
            cause: cause.unwrap_or_default(),
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
        let payload = serde_json::json!({ "errorType": error_type, "errorMessage": message });
        StateError::new(error_type, payload.to_string())
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
