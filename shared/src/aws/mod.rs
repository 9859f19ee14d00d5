//! The ports over the AWS SDK for Rust: EC2 (compute), SSM Run Command with kiln-agent and S3
//! (commands), DynamoDB (store), EventBridge (events), SSM Parameter Store (parameters).
//! Every error keeps the service's error code, classified into the `Kiln.*` kinds.

mod commands;
pub use commands::{parse_agent_pins, AGENT_SHA256_ENV};
mod compute;
#[cfg(feature = "control")]
pub mod control;
mod objects;
pub mod reaper;
mod store;
mod wake;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::errors::{classify_aws_code, ErrorKind, StageError};
use crate::ports::{BuildEvent, Events, Parameters, PortResult};

pub use commands::AGENT_KEY;

/// Where the stack keeps its state and artifacts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The DynamoDB table.
    pub table: String,
    /// The artifacts bucket (agent binaries, documents, reports, logs).
    pub bucket: String,
    /// The EventBridge bus for "Kiln Image State Change" events.
    pub event_bus: String,
    /// The region of the table and the bucket.
    pub region: String,
    /// The stack these ports run in (`KILN_STACK`): every instance, volume, image and snapshot
    /// they create carries the tag `kiln:stack` with this value, set at creation — the tag the
    /// stack's IAM policies require before any mutating EC2 call. `None` outside a stack.
    pub stack: Option<String>,
    /// The instance profile builders and test instances get when the pipeline names none
    /// (`KILN_INSTANCE_PROFILE`: the stack's, with SSM's core policy and the artifacts).
    pub instance_profile: Option<String>,
}

/// The tag that marks a resource as created by a stack (see [`Settings::stack`]).
pub const STACK_TAG: &str = "kiln:stack";

/// The AWS ports, with one client per region for the regional services.
pub struct AwsPorts {
    pub settings: Settings,
    config: aws_config::SdkConfig,
    ec2: Mutex<HashMap<String, aws_sdk_ec2::Client>>,
    ssm: Mutex<HashMap<String, aws_sdk_ssm::Client>>,
    // The clients are made at first use, so that a function's bootstrap links (and starts)
    // only the clients of the ports it holds (`Function::uses`).
    dynamodb: OnceLock<aws_sdk_dynamodb::Client>,
    s3: OnceLock<aws_sdk_s3::Client>,
    /// The artifacts bucket's objects as the stages use them (no aws-sdk-s3 client).
    objects: OnceLock<objects::Objects>,
    events: OnceLock<aws_sdk_eventbridge::Client>,
    /// Step Functions, to answer the task tokens events wake (SendTaskSuccess).
    sfn: OnceLock<aws_sdk_sfn::Client>,
    /// The SHA-256 of kiln-agent per architecture, which the commands check before running it
    /// (from `KILN_AGENT_SHA256`, or pinned by `prepare_artifacts`).
    /// A malformed `KILN_AGENT_SHA256` is kept as its error: every command then says so.
    agent_pins: Mutex<Result<std::collections::BTreeMap<String, String>, String>>,
}

impl std::fmt::Debug for AwsPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsPorts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AwsPorts {
    /// Clients from the environment's AWS configuration (credentials chain, `AWS_ENDPOINT_URL`).
    pub async fn from_env(settings: Settings) -> AwsPorts {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .load()
            .await;
        AwsPorts::new(settings, config)
    }

    pub fn new(settings: Settings, config: aws_config::SdkConfig) -> AwsPorts {
        AwsPorts {
            dynamodb: OnceLock::new(),
            events: OnceLock::new(),
            sfn: OnceLock::new(),
            s3: OnceLock::new(),
            objects: OnceLock::new(),
            ec2: Mutex::new(HashMap::new()),
            ssm: Mutex::new(HashMap::new()),
            settings,
            config,
            agent_pins: Mutex::new(
                std::env::var(AGENT_SHA256_ENV)
                    .map_or_else(|_| Ok(Default::default()), |v| parse_agent_pins(&v))
                    .map_err(|e| format!("{AGENT_SHA256_ENV} is malformed: {e}")),
            ),
        }
    }

    /// Pins kiln-agent of `arch` (x86_64, aarch64) to `sha256` (not over a malformed
    /// `KILN_AGENT_SHA256`, which stays an error).
    pub fn pin_agent(&self, arch: &str, sha256: &str) {
        if let Ok(pins) = self
            .agent_pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            pins.insert(arch.to_string(), sha256.to_string());
        }
    }

    /// The pinned agent digests, or why they cannot be read.
    pub fn agent_pins(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        self.agent_pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Creates the table and the bucket if they do not exist (tests, and `kiln run --backend aws`
    /// without a deployed stack).
    pub async fn bootstrap(&self) -> Result<(), StageError> {
        store::create_table(self.dynamodb(), &self.settings.table).await?;
        match self
            .s3()
            .create_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error("CreateBucket", e)),
        }
    }

    pub(crate) fn dynamodb(&self) -> &aws_sdk_dynamodb::Client {
        self.dynamodb
            .get_or_init(|| aws_sdk_dynamodb::Client::new(&self.config))
    }

    pub(crate) fn s3(&self) -> &aws_sdk_s3::Client {
        // Path-style S3 addressing works with custom endpoints (moto) as well as with AWS.
        self.s3.get_or_init(|| {
            aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&self.config)
                    .force_path_style(true)
                    .build(),
            )
        })
    }

    pub(crate) fn objects(&self) -> &objects::Objects {
        self.objects.get_or_init(|| {
            objects::Objects::new(&self.config, &self.settings.bucket, &self.settings.region)
        })
    }

    fn events(&self) -> &aws_sdk_eventbridge::Client {
        self.events
            .get_or_init(|| aws_sdk_eventbridge::Client::new(&self.config))
    }

    fn sfn(&self) -> &aws_sdk_sfn::Client {
        self.sfn
            .get_or_init(|| aws_sdk_sfn::Client::new(&self.config))
    }

    /// The EC2 client of a region.
    pub fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        let mut clients = self
            .ec2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                aws_sdk_ec2::Client::from_conf(
                    aws_sdk_ec2::config::Builder::from(&self.config)
                        .region(aws_config::Region::new(region.to_string()))
                        .build(),
                )
            })
            .clone()
    }

    /// The SSM client of a region.
    pub fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        let mut clients = self
            .ssm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                aws_sdk_ssm::Client::from_conf(
                    aws_sdk_ssm::config::Builder::from(&self.config)
                        .region(aws_config::Region::new(region.to_string()))
                        .build(),
                )
            })
            .clone()
    }

    pub fn ports(&self) -> crate::ports::Ports<'_> {
        crate::ports::Ports::all(self, &crate::ports::SystemClock)
    }
}

/// An SDK error as a stage error: the operation, the service's message and code, classified.
pub(crate) fn sdk_error<E, R>(operation: &str, e: SdkError<E, R>) -> StageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = e.code().map(str::to_string);
    let kind = match (&e, code.as_deref()) {
        (
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_),
            _,
        ) => ErrorKind::Retryable,
        (_, Some(c)) => classify_aws_code(c),
        _ => ErrorKind::Internal,
    };
    let message = format!(
        "{operation}: {}",
        e.message()
            .map(str::to_string)
            .unwrap_or_else(|| DisplayErrorContext(&e).to_string())
    );
    let err = StageError::new(kind, message);
    match code {
        Some(c) => err.with_code(c),
        None => err,
    }
}

/// The bus of the pipelines' parent-change rules: AWS's services (Parameter Store's "Parameter
/// Store Change" among them) send their events to the account's default bus only, so a rule on
/// the stack's own bus (`EventBusName`) would never fire. kiln's own status events go to that one.
pub const AWS_EVENTS_BUS: &str = "default";

/// The failure policy's switch: the pipeline's EventBridge rules (`kiln-<pipeline>-*`, created by
/// `kiln apply`) are disabled.
impl crate::ports::Triggers for AwsPorts {
    fn disable<'a>(&'a self, pipeline: &'a str, _reason: &'a str) -> PortResult<'a, bool> {
        Box::pin(async move {
            let rules = self
                .events()
                .list_rules()
                .name_prefix(format!("kiln-{pipeline}-"))
                .event_bus_name(AWS_EVENTS_BUS)
                .send()
                .await
                .map_err(|e| sdk_error("ListRules", e))?;
            let mut any = false;
            #[cfg(feature = "control")]
            {
                any |= self
                    .disable_schedule(&control::schedule_name(pipeline))
                    .await?;
            }
            for rule in rules.rules() {
                if let Some(name) = rule.name() {
                    self.events()
                        .disable_rule()
                        .name(name)
                        .event_bus_name(AWS_EVENTS_BUS)
                        .send()
                        .await
                        .map_err(|e| sdk_error("DisableRule", e))?;
                    any = true;
                }
            }
            Ok(any)
        })
    }
}

#[cfg(feature = "control")]
impl AwsPorts {
    /// Disables an EventBridge Scheduler schedule, keeping its definition; false when missing.
    async fn disable_schedule(&self, name: &str) -> Result<bool, StageError> {
        let scheduler = aws_sdk_scheduler::Client::new(&self.config);
        let Ok(s) = scheduler.get_schedule().name(name).send().await else {
            return Ok(false);
        };
        let mut update = scheduler
            .update_schedule()
            .name(name)
            .set_schedule_expression(s.schedule_expression().map(str::to_string))
            .set_schedule_expression_timezone(s.schedule_expression_timezone().map(str::to_string))
            .set_flexible_time_window(s.flexible_time_window().cloned())
            .set_target(s.target().cloned())
            .state(aws_sdk_scheduler::types::ScheduleState::Disabled);
        if let Some(g) = s.group_name() {
            update = update.group_name(g);
        }
        update
            .send()
            .await
            .map_err(|e| sdk_error("UpdateSchedule", e))?;
        Ok(true)
    }
}

impl Events for AwsPorts {
    fn emit<'a>(&'a self, event: &'a BuildEvent) -> PortResult<'a, ()> {
        Box::pin(async move {
            let detail = serde_json::to_string(event)
                .map_err(|e| StageError::new(ErrorKind::Internal, e.to_string()))?;
            let entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .source("kiln")
                .detail_type("Kiln Image State Change")
                .detail(detail)
                .event_bus_name(&self.settings.event_bus)
                .resources(format!("kiln:build/{}", event.build))
                .build();
            let out = self
                .events()
                .put_events()
                .entries(entry)
                .send()
                .await
                .map_err(|e| sdk_error("PutEvents", e))?;
            if out.failed_entry_count() > 0 {
                let why = out
                    .entries()
                    .iter()
                    .filter_map(|e| e.error_message())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(StageError::new(
                    ErrorKind::Retryable,
                    format!("PutEvents: {why}"),
                ));
            }
            Ok(())
        })
    }
}

impl Parameters for AwsPorts {
    fn get<'a>(&'a self, region: &'a str, name: &'a str) -> PortResult<'a, Option<String>> {
        Box::pin(async move {
            match self.ssm(region).get_parameter().name(name).send().await {
                Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
                Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
                Err(e) => Err(sdk_error("GetParameter", e)),
            }
        })
    }

    fn put<'a>(&'a self, region: &'a str, name: &'a str, value: &'a str) -> PortResult<'a, ()> {
        Box::pin(async move {
            self.ssm(region)
                .put_parameter()
                .name(name)
                .value(value)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .data_type("aws:ec2:image")
                .overwrite(true)
                .send()
                .await
                .map_err(|e| sdk_error("PutParameter", e))?;
            Ok(())
        })
    }
}

impl crate::ports::PortsProvider for AwsPorts {
    fn ports(&self) -> crate::ports::Ports<'_> {
        AwsPorts::ports(self)
    }
}
