//! The reaper: the cleanup of executions that ended outside kiln's Catch — stopped ("Stop
//! execution" in the console, StopExecution), timed out, or failed by an error no Catch takes
//! (States.DataLimitExceeded, States.Runtime). Step Functions runs no state after those, so the
//! stack's EventBridge rule sends their "Step Functions Execution Status Change" events to the
//! cleanup function, and this runs `stages::cleanup::reap` for the execution's build.
//!
//! The event is only a hint: the execution's status, name and input are read back with
//! DescribeExecution (the role may describe the stack's executions only), and nothing is done
//! unless Step Functions says the execution has ended, so an early, repeated or forged event
//! cleans nothing that still runs.

use serde_json::{json, Value as Json};

use super::{sdk_error, AwsPorts};
use crate::errors::{ErrorKind, StageError};
use crate::ports::Ports;

/// The `detail-type` of Step Functions' execution events.
pub const STATUS_CHANGE: &str = "Step Functions Execution Status Change";

/// Whether `event` is a Step Functions execution status change, as EventBridge delivers it.
pub fn is_status_change(event: &Json) -> bool {
    event.get("source").and_then(Json::as_str) == Some("aws.states")
        && event.get("detail-type").and_then(Json::as_str) == Some(STATUS_CHANGE)
}

/// The reaper of one stack's executions.
#[derive(Debug)]
pub struct Reaper {
    aws: &'static AwsPorts,
    /// The stack's state machine (`KILN_STATE_MACHINE_ARN`); `None` refuses every event.
    state_machine: Option<String>,
}

/// Why an execution ended, as the cleanup records it.
fn reason(status: &str, error: Option<&str>, cause: Option<&str>) -> (String, String) {
    let said = |what: &str| match cause.filter(|c| !c.is_empty()) {
        Some(c) => format!("{what}: {c}"),
        None => what.to_string(),
    };
    match status {
        "ABORTED" => (
            ErrorKind::Cancelled.error_type().to_string(),
            said("the execution was stopped (ABORTED)"),
        ),
        "TIMED_OUT" => (
            "States.Timeout".to_string(),
            said("the execution timed out (TIMED_OUT)"),
        ),
        _ => (
            error
                .filter(|e| !e.is_empty())
                .unwrap_or("States.Runtime")
                .to_string(),
            said("the execution failed outside kiln's Catch (FAILED)"),
        ),
    }
}

impl Reaper {
    pub fn new(aws: &'static AwsPorts, state_machine: Option<String>) -> Reaper {
        Reaper {
            aws,
            state_machine: state_machine.filter(|s| !s.is_empty()),
        }
    }

    /// Handles one status-change event: `{"execution", "status", "reaped": …}` says what was
    /// found and done. Only an error of the AWS calls is an error (EventBridge's asynchronous
    /// invocation retries it).
    pub async fn on_event(&self, ports: &Ports<'_>, event: &Json) -> Result<Json, StageError> {
        let Some(machine) = &self.state_machine else {
            return Err(StageError::new(
                ErrorKind::Internal,
                "the reaper needs KILN_STATE_MACHINE_ARN, the stack's state machine",
            ));
        };
        let arn = event["detail"]["executionArn"].as_str().unwrap_or_default();
        let ignored = |why: &str| -> Result<Json, StageError> {
            Ok(json!({"execution": arn, "reaped": false, "why": why}))
        };
        // arn:…:stateMachine:NAME → arn:…:execution:NAME:<execution name>
        let executions = format!("{}:", machine.replacen(":stateMachine:", ":execution:", 1));
        if !arn.starts_with(&executions) {
            return ignored("not an execution of this stack's state machine");
        }
        let described = match self
            .aws
            .sfn()
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
        {
            Ok(d) => d,
            Err(e)
                if aws_sdk_sfn::error::ProvideErrorMetadata::code(&e)
                    == Some("ExecutionDoesNotExist") =>
            {
                return ignored("no such execution");
            }
            Err(e) => return Err(sdk_error("DescribeExecution", e)),
        };
        let status = described.status().as_str();
        if described.state_machine_arn() != machine {
            return ignored("not an execution of this stack's state machine");
        }
        // RUNNING, SUCCEEDED (a build that ended through its own states) and PENDING_REDRIVE
        // (about to run again) are left alone, whatever the event says.
        if !matches!(status, "ABORTED" | "TIMED_OUT" | "FAILED") {
            return Ok(json!({"execution": arn, "status": status, "reaped": false,
                             "why": format!("the execution is {status}")}));
        }
        let request = described.name().unwrap_or_default();
        let pipeline = described
            .input()
            .and_then(|i| serde_json::from_str::<Json>(i).ok())
            .and_then(|i| i["pipeline"].as_str().map(str::to_string));
        let (error, cause) = reason(status, described.error(), described.cause());
        let reaped =
            crate::stages::cleanup::reap(ports, pipeline.as_deref(), request, &error, &cause)
                .await?;
        Ok(
            json!({"execution": arn, "status": status, "reaped": reaped.concluded,
                  "build": reaped.build, "was": reaped.was, "now": reaped.now}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_execution_cancels_and_the_others_fail_with_their_error() {
        assert_eq!(
            reason("ABORTED", None, Some("")),
            (
                "Kiln.Cancelled".into(),
                "the execution was stopped (ABORTED)".into()
            )
        );
        assert_eq!(reason("TIMED_OUT", None, None).0, "States.Timeout");
        let (error, cause) = reason(
            "FAILED",
            Some("States.DataLimitExceeded"),
            Some("the state's output is over 256 KiB"),
        );
        assert_eq!(error, "States.DataLimitExceeded");
        assert!(
            cause.ends_with(": the state's output is over 256 KiB"),
            "{cause}"
        );
    }

    #[test]
    fn only_step_functions_status_changes_are_taken_for_the_reaper() {
        let event = json!({"source": "aws.states", "detail-type": STATUS_CHANGE, "detail": {}});
        assert!(is_status_change(&event));
        assert!(!is_status_change(
            &json!({"source": "kiln", "detail-type": STATUS_CHANGE})
        ));
        assert!(!is_status_change(&json!({"op": "lifecycle"})));
    }
}
