//! What every stage Lambda function does at start-up, in one place: configuration from the
//! environment, JSON logs, the AWS clients once, then the stage handler for each invocation
//! with errors turned into `Diagnostic`s that carry the stable `Kiln.*` errorType.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value as Json;

use crate::aws::{AwsPorts, Settings};
use crate::errors::StageError;
use crate::stages::handler::{handle, Function};

/// The environment variables the functions read (set by infra/template.yaml).
pub mod env {
    pub const TABLE: &str = "KILN_TABLE";
    pub const BUCKET: &str = "KILN_ARTIFACTS_BUCKET";
    pub const EVENT_BUS: &str = "KILN_EVENT_BUS";
    pub const REGION: &str = "AWS_REGION";
    /// The stack's name: the value of the `kiln:stack` tag on what the functions create.
    pub const STACK: &str = "KILN_STACK";
    /// The stack's builder instance profile, for pipelines that name none.
    pub const INSTANCE_PROFILE: &str = "KILN_INSTANCE_PROFILE";
    /// The trigger function: the state machine it starts.
    pub const STATE_MACHINE: &str = "KILN_STATE_MACHINE_ARN";
}

/// The functions' configuration, read once.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| format!("the environment variable {name} is not set"))
        };
        Ok(Config {
            settings: Settings {
                table: var(env::TABLE)?,
                bucket: var(env::BUCKET)?,
                event_bus: std::env::var(env::EVENT_BUS).unwrap_or_else(|_| "default".into()),
                region: var(env::REGION)?,
                stack: std::env::var(env::STACK).ok().filter(|s| !s.is_empty()),
                instance_profile: std::env::var(env::INSTANCE_PROFILE)
                    .ok()
                    .filter(|s| !s.is_empty()),
            },
        })
    }
}

/// A stage error as Lambda reports it: `errorType` is the contract name.
#[derive(Debug)]
pub struct LambdaError(pub StageError);

impl From<LambdaError> for Diagnostic {
    fn from(e: LambdaError) -> Diagnostic {
        Diagnostic {
            error_type: e.0.error_type().to_string(),
            error_message: e.0.to_string(),
        }
    }
}

fn init_logs() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_current_span(false)
        .without_time()
        .init();
}

/// Runs the trigger function: parent-image events in, deduplicated StartExecution calls out.
pub async fn run_trigger() -> Result<(), lambda_runtime::Error> {
    init_logs();
    let config = Config::from_env()?;
    let state_machine = std::env::var(env::STATE_MACHINE)
        .map_err(|_| format!("the environment variable {} is not set", env::STATE_MACHINE))?;
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.settings.region.clone()))
        .load()
        .await;
    let s = config.settings;
    let control = crate::aws::control::Control::new(
        crate::aws::control::Stack {
            name: String::new(),
            region: s.region,
            table: s.table,
            bucket: s.bucket,
            state_machine_arn: state_machine,
            scheduler_role_arn: None,
            trigger_function_arn: None,
            event_bus: s.event_bus,
        },
        &aws,
    );
    let control = &control;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Json>| async move {
        let result = crate::aws::control::trigger(control, &event.payload).await;
        match &result {
            Ok(out) => tracing::info!(result = %out, "trigger"),
            Err(e) => tracing::error!(error_type = e.error_type(), error = %e, "trigger failed"),
        }
        result.map_err(LambdaError)
    }))
    .await
}

/// Runs `function` as a Lambda function until the runtime stops it.
pub async fn run(function: Function) -> Result<(), lambda_runtime::Error> {
    init_logs();
    let config = Config::from_env()?;
    let ports = AwsPorts::from_env(config.settings).await;
    let ports = &ports;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Json>| async move {
        let op = event.payload.get("op").and_then(Json::as_str).unwrap_or("-").to_string();
        let result = handle(&ports.ports(), function, event.payload).await;
        match &result {
            Ok(_) => tracing::info!(stage = function.name(), op = op.as_str(), "done"),
            Err(e) => tracing::error!(stage = function.name(), op = op.as_str(), error_type = e.error_type(), error = %e, "failed"),
        }
        result.map_err(LambdaError)
    }))
    .await
}
