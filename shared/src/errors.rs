//! The errors stages raise, and their stable names: the contract between the stage functions
//! and the state machine (`ErrorEquals` in infra/statemachine/pipeline.asl.json).

use std::fmt;

/// What kind of failure a stage hit; `error_type()` is the name Step Functions sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Throttling, eventual consistency, a transient service error: retried with backoff.
    Retryable,
    /// No capacity for any of the instance types.
    Capacity,
    /// The pipeline definition cannot be built (parent not found, invalid document, …).
    InvalidPipeline,
    /// A build or validate component failed on the builder.
    ComponentFailed,
    /// A test component failed on the test instance.
    TestFailed,
    /// A stage took longer than the pipeline allows.
    Timeout,
    /// The build was cancelled.
    Cancelled,
    /// Another build of the pipeline holds the lock.
    Locked,
    /// Anything else; not retried.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Retryable,
        ErrorKind::Capacity,
        ErrorKind::InvalidPipeline,
        ErrorKind::ComponentFailed,
        ErrorKind::TestFailed,
        ErrorKind::Timeout,
        ErrorKind::Cancelled,
        ErrorKind::Locked,
        ErrorKind::Internal,
    ];

    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "Kiln.Retryable",
            ErrorKind::Capacity => "Kiln.Capacity",
            ErrorKind::InvalidPipeline => "Kiln.InvalidPipeline",
            ErrorKind::ComponentFailed => "Kiln.ComponentFailed",
            ErrorKind::TestFailed => "Kiln.TestFailed",
            ErrorKind::Timeout => "Kiln.Timeout",
            ErrorKind::Cancelled => "Kiln.Cancelled",
            ErrorKind::Locked => "Kiln.Locked",
            ErrorKind::Internal => "Kiln.Internal",
        }
    }
}

/// A stage failure: its kind, what happened (for the user) and, for AWS errors, the service's
/// error code so retryable and terminal failures stay apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    pub kind: ErrorKind,
    pub message: String,
    pub code: Option<String>,
}

impl StageError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StageError {
            kind,
            message: message.into(),
            code: None,
        }
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn error_type(&self) -> &'static str {
        self.kind.error_type()
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(c) = &self.code {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StageError {}

/// How an AWS error code is classified: throttling and eventual consistency are retried,
/// capacity errors move to the next instance type, the rest end the build.
pub fn classify_aws_code(code: &str) -> ErrorKind {
    match code {
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "ServiceUnavailable"
        | "InternalError"
        | "InternalFailure"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "ProvisionedThroughputExceededException"
        | "InvalidInstanceID.NotFound"
        | "InvalidAMIID.NotFound"
        | "IncorrectInstanceState"
        | "InvalidInstanceId"
        | "InvalidParameterValue.IamInstanceProfile" => ErrorKind::Retryable,
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "Unsupported"
        | "InsufficientHostCapacity"
        | "InstanceLimitExceeded" => ErrorKind::Capacity,
        _ => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_unique_and_namespaced() {
        let names: std::collections::BTreeSet<&str> =
            ErrorKind::ALL.iter().map(|k| k.error_type()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        assert!(names.iter().all(|n| n.starts_with("Kiln.")));
    }

    #[test]
    fn aws_codes_are_classified() {
        assert_eq!(
            classify_aws_code("RequestLimitExceeded"),
            ErrorKind::Retryable
        );
        assert_eq!(
            classify_aws_code("InvalidInstanceID.NotFound"),
            ErrorKind::Retryable,
            "eventual consistency right after launch"
        );
        assert_eq!(
            classify_aws_code("InsufficientInstanceCapacity"),
            ErrorKind::Capacity
        );
        assert_eq!(
            classify_aws_code("UnauthorizedOperation"),
            ErrorKind::Internal
        );
    }
}
