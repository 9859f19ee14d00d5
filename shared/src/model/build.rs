//! One build, as data: the typed document every stage receives and returns, and that the state
//! machine carries from state to state (merged with ResultPath).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::fingerprint::Fingerprint;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A ULID: sortable by creation time, unique without coordination.
    BuildId
);
id_type!(
    /// An EC2 instance id, or an embedded sandbox id of the same shape.
    InstanceId
);
id_type!(
    /// An AMI id, or an embedded image id of the same shape.
    ImageId
);
id_type!(
    /// An SSM command id, or an embedded command id.
    CommandId
);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl BuildId {
    /// A new ULID for the time `millis` since the epoch.
    pub fn new_at(millis: u64) -> BuildId {
        let random = uuid::Uuid::new_v4().as_u128() & ((1u128 << 80) - 1);
        let value: u128 = (u128::from(millis & ((1 << 48) - 1)) << 80) | random;
        let text: String = (0..26)
            .rev()
            .map(|i| CROCKFORD[((value >> (i * 5)) & 31) as usize] as char)
            .collect();
        BuildId(text)
    }

    /// The idempotency token for an operation of this build (EC2 ClientToken, ≤ 64 chars).
    pub fn token(&self, purpose: &str) -> String {
        format!("{}-{purpose}", self.0).chars().take(64).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TriggerKind {
    Schedule,
    Manual,
    Event,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    pub kind: TriggerKind,
    /// What fired it: the rule, the changed parameter, the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where a build is. Transitions only move forward (the store enforces it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BuildStatus {
    Pending,
    Building,
    Snapshotting,
    Testing,
    Distributing,
    Available,
    Skipped,
    Failed,
    Cancelled,
}

impl BuildStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BuildStatus::Available
                | BuildStatus::Skipped
                | BuildStatus::Failed
                | BuildStatus::Cancelled
        )
    }

    /// Whether a build may move from `self` to `next`.
    pub fn can_become(self, next: BuildStatus) -> bool {
        use BuildStatus::*;
        if self == next {
            return true;
        }
        match self {
            Pending => next != Pending,
            Building => matches!(next, Snapshotting | Failed | Cancelled),
            Snapshotting => matches!(next, Testing | Distributing | Failed | Cancelled),
            Testing => matches!(next, Distributing | Failed | Cancelled),
            Distributing => matches!(next, Available | Failed | Cancelled),
            Available | Skipped | Failed | Cancelled => false,
        }
    }

    /// The status named `text` (`AVAILABLE`, …).
    pub fn parse(text: &str) -> Option<BuildStatus> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "PENDING",
            BuildStatus::Building => "BUILDING",
            BuildStatus::Snapshotting => "SNAPSHOTTING",
            BuildStatus::Testing => "TESTING",
            BuildStatus::Distributing => "DISTRIBUTING",
            BuildStatus::Available => "AVAILABLE",
            BuildStatus::Skipped => "SKIPPED",
            BuildStatus::Failed => "FAILED",
            BuildStatus::Cancelled => "CANCELLED",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRef {
    pub id: InstanceId,
    pub instance_type: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegionState {
    Copying,
    Available,
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionImage {
    pub region: String,
    pub image: Option<ImageId>,
    pub state: RegionState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageTimes {
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

/// What a check waits on that AWS announces with an EventBridge event — an instance's state, an
/// image's state, a command's status — and the states (as the event and Describe* name them)
/// that end the wait. The state machine then waits for a task token the event answers, not a
/// fixed time (see `stages::wake`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Awaited {
    pub kind: AwaitedKind,
    pub region: String,
    /// The instance, image or command.
    pub id: String,
    /// A command's instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub until: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AwaitedKind {
    /// "EC2 Instance State-change Notification": `detail.instance-id`, `detail.state`.
    Instance,
    /// "EC2 AMI State Change": `detail.ImageId`, `detail.State`.
    Image,
    /// "EC2 Command Status-change Notification": `detail.command-id`, `detail.status`.
    Command,
}

impl Awaited {
    /// An instance until it is running (or gone).
    pub fn running(region: &str, instance: &InstanceId) -> Awaited {
        Awaited::instance(
            region,
            instance,
            &["running", "shutting-down", "terminated"],
        )
    }

    /// An instance until it has stopped (or gone).
    pub fn stopped(region: &str, instance: &InstanceId) -> Awaited {
        Awaited::instance(
            region,
            instance,
            &["stopped", "shutting-down", "terminated"],
        )
    }

    fn instance(region: &str, instance: &InstanceId, until: &[&str]) -> Awaited {
        Awaited {
            kind: AwaitedKind::Instance,
            region: region.into(),
            id: instance.as_str().into(),
            instance: None,
            until: until.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// An image until it is available or failed.
    pub fn image(region: &str, image: &ImageId) -> Awaited {
        Awaited {
            kind: AwaitedKind::Image,
            region: region.into(),
            id: image.as_str().into(),
            instance: None,
            until: vec!["available".into(), "failed".into()],
        }
    }

    /// A command until it has ended, however it ended.
    pub fn command(region: &str, instance: &InstanceId, command: &CommandId) -> Awaited {
        Awaited {
            kind: AwaitedKind::Command,
            region: region.into(),
            id: command.as_str().into(),
            instance: Some(instance.as_str().into()),
            until: ["Success", "Failed", "Cancelled", "TimedOut"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Why a build failed, for the record, the event and the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureContext {
    pub stage: String,
    pub error: String,
    pub message: String,
}

/// The build document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub id: BuildId,
    pub pipeline: String,
    /// The pipeline definition's version, `x.y.z`.
    pub definition_version: String,
    /// `n` in `x.y.z/n`.
    pub build_number: u32,
    pub trigger: Trigger,
    /// The execution that started the build: a retried start finds the build by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub status: BuildStatus,
    pub home_region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_image: Option<ImageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<InstanceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customize_command: Option<CommandId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_instance: Option<InstanceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_command: Option<CommandId>,
    #[serde(default)]
    pub regions: Vec<RegionImage>,
    #[serde(default)]
    pub stages: BTreeMap<String, StageTimes>,
    /// Set by `check` operations: the state machine's Choice moves on when true.
    #[serde(default)]
    pub ready: bool,
    /// When not ready: what an event will announce, if AWS announces it (cleared by each check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaited>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureContext>,
    /// UTC, `YYYYMMDDhhmmss`, for image names.
    pub build_date: String,
}

impl Build {
    /// `x.y.z/n`
    pub fn version(&self) -> String {
        format!("{}/{}", self.definition_version, self.build_number)
    }

    /// Every instance the build launched.
    pub fn instances(&self) -> Vec<InstanceId> {
        self.builder
            .iter()
            .chain(self.test_instance.iter())
            .map(|i| i.id.clone())
            .collect()
    }
}

/// The one build whose id starts with `prefix` (users give ids shortened); `Err` naming the
/// problem when several match.
pub fn find_by_prefix(
    builds: impl IntoIterator<Item = Build>,
    prefix: &str,
) -> Result<Option<Build>, String> {
    let mut hits = builds.into_iter().filter(|b| b.id.0.starts_with(prefix));
    let first = hits.next();
    if hits.next().is_some() {
        return Err(format!(
            "`{prefix}` names more than one build; give more of the id"
        ));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_sort_by_time_and_are_26_crockford_characters() {
        let a = BuildId::new_at(1_700_000_000_000);
        let b = BuildId::new_at(1_700_000_000_001);
        assert_eq!(a.0.len(), 26);
        assert!(a < b);
        assert!(a.0.bytes().all(|c| CROCKFORD.contains(&c)));
        assert!(a.token("builder").len() <= 64);
    }

    #[test]
    fn statuses_only_move_forward() {
        use BuildStatus::*;
        assert!(Building.can_become(Snapshotting));
        assert!(
            !Snapshotting.can_become(Building),
            "a stale retry cannot move a build backwards"
        );
        assert!(!Available.can_become(Failed));
        assert!(Testing.can_become(Cancelled));
    }
}
