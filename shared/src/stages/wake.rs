//! wake: the end of a wait by an event, not a timer. A stage's check that finds AWS still at work
//! names what it awaits ([`Awaited`]: an instance's state, an image's, a command's status); the
//! state machine then runs a `.waitForTaskToken` Task whose token [`watch`] keeps, and the event
//! AWS sends when that changes — EC2 Instance State-change Notification, EC2 AMI State Change,
//! EC2 Command Status-change Notification, through the stack's EventBridge rules — answers it
//! ([`on_event`]), so the check runs again at once. The Task's timeout (`waitSeconds`) is the
//! bounded poll for the events AWS does not deliver (they are best effort).
//!
//! The embedded engine runs the same definition: its event source reads the local cloud's state
//! ([`current`]) and announces each change through [`announce`], as the stack's rules do.

use serde_json::{json, Value as Json};

use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Awaited, AwaitedKind, CommandId, ImageId, InstanceId};
use crate::ports::{CommandStatus, ImageState, InstanceState, Ports};

/// A state change, as an event announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub region: String,
    pub id: String,
    pub state: String,
}

/// Keeps `token` for `awaited`. What awaited may have changed between the check and now (its
/// event then came before the token was kept): if it already has, the token is answered here.
pub async fn watch(ports: &Ports<'_>, token: &str, awaited: &Awaited) -> Result<Json, StageError> {
    if token.is_empty() || awaited.until.is_empty() {
        return Err(StageError::new(
            ErrorKind::Internal,
            "wake watch: the event has no token or nothing to await",
        ));
    }
    ports.wakeups.register(token, awaited).await?;
    // A look that fails (a new image Describe does not know yet, a throttled call) leaves the
    // token to the event and the timeout.
    let state = current(ports, awaited).await.ok();
    let woken = match &state {
        Some(s) if awaited.until.contains(s) => {
            ports
                .wakeups
                .wake(token, awaited, &json!({"state": s, "by": "watch"}))
                .await?
        }
        _ => false,
    };
    Ok(json!({"state": state, "woken": woken}))
}

/// The state of what `awaited` names now, in the words its event uses.
pub async fn current(ports: &Ports<'_>, awaited: &Awaited) -> Result<String, StageError> {
    Ok(match awaited.kind {
        AwaitedKind::Instance => {
            let id = InstanceId(awaited.id.clone());
            match ports.compute.instance_state(&awaited.region, &id).await? {
                InstanceState::Pending => "pending",
                InstanceState::Running => "running",
                InstanceState::Stopping => "stopping",
                InstanceState::Stopped => "stopped",
                InstanceState::Terminated => "terminated",
            }
            .to_string()
        }
        AwaitedKind::Image => {
            let id = ImageId(awaited.id.clone());
            match ports.compute.image_state(&awaited.region, &id).await? {
                ImageState::Pending => "pending",
                ImageState::Available => "available",
                ImageState::Failed(_) => "failed",
            }
            .to_string()
        }
        AwaitedKind::Command => {
            let instance = InstanceId(awaited.instance.clone().unwrap_or_default());
            let command = CommandId(awaited.id.clone());
            match ports
                .commands
                .status(&awaited.region, &instance, &command)
                .await?
            {
                CommandStatus::InProgress => "InProgress",
                CommandStatus::Success => "Success",
                CommandStatus::Failed { .. } => "Failed",
            }
            .to_string()
        }
    })
}

/// What an EventBridge event announces, if it is one of the three kinds kiln awaits.
pub fn parse_event(event: &Json) -> Option<Announced> {
    let d = &event["detail"];
    let text = |v: &Json| v.as_str().map(str::to_string);
    let (id, state) = match event["detail-type"].as_str()? {
        "EC2 Instance State-change Notification" => (text(&d["instance-id"])?, text(&d["state"])?),
        "EC2 AMI State Change" => (text(&d["ImageId"])?, text(&d["State"])?),
        "EC2 Command Status-change Notification" => (text(&d["command-id"])?, text(&d["status"])?),
        _ => return None,
    };
    Some(Announced {
        region: text(&event["region"])?,
        id,
        state,
    })
}

/// The stack's rules' target: answers every token kept for the announced resource whose wait
/// the new state ends.
pub async fn on_event(ports: &Ports<'_>, event: &Json) -> Result<Json, StageError> {
    match parse_event(event) {
        Some(a) => Ok(json!({"woken": announce(ports, &a).await?})),
        None => Ok(json!({"woken": 0, "ignored": event["detail-type"]})),
    }
}

/// Answers the tokens `announced` ends the wait of; how many were answered.
pub async fn announce(ports: &Ports<'_>, announced: &Announced) -> Result<usize, StageError> {
    let mut woken = 0;
    for (token, awaited) in ports
        .wakeups
        .registered(&announced.region, &announced.id)
        .await?
    {
        if awaited.until.contains(&announced.state)
            && ports
                .wakeups
                .wake(
                    &token,
                    &awaited,
                    &json!({"state": announced.state, "by": "event"}),
                )
                .await?
        {
            woken += 1;
        }
    }
    Ok(woken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_events_are_read_as_aws_sends_them() {
        // The shapes of the EC2 and Systems Manager event references.
        let instance = json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
            "region": "us-east-1", "detail": {"instance-id": "i-0abc", "state": "running"}});
        let image = json!({"detail-type": "EC2 AMI State Change", "source": "aws.ec2",
            "region": "eu-central-1", "detail": {"RequestId": "r", "ImageId": "ami-1", "State": "available", "ErrorMessage": ""}});
        let command = json!({"detail-type": "EC2 Command Status-change Notification", "source": "aws.ssm",
            "region": "us-east-1", "detail": {"command-id": "c-1", "status": "Success", "document-name": "AWS-RunShellScript"}});
        assert_eq!(
            parse_event(&instance),
            Some(Announced {
                region: "us-east-1".into(),
                id: "i-0abc".into(),
                state: "running".into()
            })
        );
        assert_eq!(parse_event(&image).unwrap().state, "available");
        assert_eq!(parse_event(&command).unwrap().id, "c-1");
        assert_eq!(
            parse_event(&json!({"detail-type": "Kiln Image State Change"})),
            None
        );
        assert_eq!(
            parse_event(&json!({"detail-type": "EC2 AMI State Change", "detail": {}})),
            None
        );
    }
}

/// Tokens kept in memory and answered in the engine ([`crate::engine::tokens::TaskTokens`]):
/// the embedded engine's, the simulation's and the in-memory cloud's.
#[cfg(feature = "engine")]
#[derive(Debug, Default)]
pub struct KeptTokens {
    tokens: std::sync::Arc<crate::engine::tokens::TaskTokens>,
    kept: std::sync::Mutex<Vec<(String, Awaited)>>,
}

#[cfg(feature = "engine")]
impl KeptTokens {
    /// The tokens of the engine that runs with [`crate::engine::Engine::with_tokens`].
    pub fn tokens(&self) -> std::sync::Arc<crate::engine::tokens::TaskTokens> {
        self.tokens.clone()
    }

    /// What the kept tokens await, each once.
    pub fn awaited(&self) -> Vec<Awaited> {
        let mut out: Vec<Awaited> = Vec::new();
        for (_, a) in self.lock().iter() {
            if !out.iter().any(|o| o.region == a.region && o.id == a.id) {
                out.push(a.clone());
            }
        }
        out
    }

    /// The embedded event source: every `interval`, the state of each awaited resource of the
    /// local cloud, announced as the stack's rules announce AWS's events. Local sandboxes and
    /// image stores send no events of their own: reading their state is what they offer.
    pub async fn serve(
        &self,
        provider: &dyn crate::ports::PortsProvider,
        interval: std::time::Duration,
    ) {
        loop {
            tokio::time::sleep(interval).await;
            let ports = provider.ports();
            for a in self.awaited() {
                // A read that fails is tried again at the next tick, as an event is retried.
                if let Ok(state) = current(&ports, &a).await {
                    let announced = Announced {
                        region: a.region.clone(),
                        id: a.id.clone(),
                        state,
                    };
                    let _ = announce(&ports, &announced).await;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Awaited)>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(feature = "engine")]
impl crate::ports::Wakeups for KeptTokens {
    fn register<'a>(
        &'a self,
        token: &'a str,
        awaited: &'a Awaited,
    ) -> crate::ports::PortResult<'a, ()> {
        self.lock().push((token.to_string(), awaited.clone()));
        Box::pin(async { Ok(()) })
    }

    fn registered<'a>(
        &'a self,
        region: &'a str,
        id: &'a str,
    ) -> crate::ports::PortResult<'a, Vec<(String, Awaited)>> {
        let out = self
            .lock()
            .iter()
            .filter(|(_, a)| a.region == region && a.id == id)
            .cloned()
            .collect();
        Box::pin(async { Ok(out) })
    }

    fn wake<'a>(
        &'a self,
        token: &'a str,
        _awaited: &'a Awaited,
        output: &'a Json,
    ) -> crate::ports::PortResult<'a, bool> {
        self.lock().retain(|(t, _)| t != token);
        let woken = self.tokens.succeed(token, output.clone()).is_ok();
        Box::pin(async move { Ok(woken) })
    }
}
