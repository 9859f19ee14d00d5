//! Errors as Step Functions names them: an error name and a cause, with the rules for which
//! names a Retry or Catch matches.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateError {
    pub error: String,
    pub cause: String,
}

impl StateError {
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> Self {
        StateError {
            error: error.into(),
            cause: cause.into(),
        }
    }

    /// The error a Lambda function's failure becomes: `errorType` is the Error, the error
    /// payload (as JSON text) is the Cause.
    pub fn from_lambda(error_type: &str, message: &str) -> Self {
        let payload = serde_json::json!({ "errorType": error_type, "errorMessage": message });
        StateError::new(error_type, payload.to_string())
    }

    /// Whether a Retry or Catch with `names` handles this error.
    pub fn matches(&self, names: &[String], in_task: bool) -> bool {
        if self.error == "States.Runtime" {
            return false;
        }
        names.iter().any(|n| match n.as_str() {
            "States.ALL" => self.error != "States.DataLimitExceeded",
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
