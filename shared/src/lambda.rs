//! What every stage Lambda function does at start-up, in one place: configuration from the
//! environment, JSON logs, the AWS clients once, then the stage handler for each invocation
//! with errors turned into `Diagnostic`s that carry the stable `Kiln.*` errorType.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value as Json;

use crate::aws::{AwsPorts, Settings};
use crate::errors::StageError;
use crate::ports::{Calls, Ports, Select, SystemClock};
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
    /// The trigger function: the state machine it starts; the cleanup function: the state
    /// machine whose ended executions it reaps.
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

/// The SDK configuration inside Lambda: the region, and the credentials Lambda puts in the
/// environment (the function's role session), which aws-config's default chain would also find
/// there first; `AWS_ENDPOINT_URL` (the tests' moto) and `AWS_MAX_ATTEMPTS` when set. Retries
/// (standard, 3 attempts), the connect timeout (3.1 s) and the lazy identity cache are the ones
/// aws-config sets for the latest behaviour version; the HTTP client is the SDK's default.
///
/// Not loading the default chain keeps its profile, SSO, web identity, ECS and IMDS providers,
/// and the STS client they use, out of every bootstrap: Lambda has none of them.
pub fn sdk_config(region: &str) -> aws_config::SdkConfig {
    let attempts = std::env::var("AWS_MAX_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3);
    let mut config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        ))
        .identity_cache(aws_config::identity::IdentityCache::lazy().build())
        .http_client(https_client())
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(attempts))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_millis(3100))
                .build(),
        );
    if let Some(url) = std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        config = config.endpoint_url(url);
    }
    config.build()
}

/// The functions' HTTPS client: hyper 1 and rustls over ring, the CA certificates from the
/// system (the Lambda runtime's bundle). The SDK's own default (aws-lc) is not compiled into the
/// functions; see the workspace's Cargo.toml.
fn https_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
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
    let aws = sdk_config(&config.settings.region);
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

/// A stage function's bootstrap: the function, and its ports made of the AWS ports.
///
/// Each function's `main` runs its own constant ([`LAUNCH_BUILDER`], …), whose `ports` is a
/// [`Select`] of the calls of [`Function::uses`] over the AWS ports, resolved at compile time:
/// the AWS operations of every other call, and the SDK clients only they use, are not linked
/// into that bootstrap (`make package` lists the clients each one links).
#[derive(Clone, Copy)]
pub struct Bootstrap {
    pub function: Function,
    pub ports: fn(&'static AwsPorts) -> Ports<'static>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("function", &self.function)
            .finish_non_exhaustive()
    }
}

macro_rules! bootstraps {
    ($($name:ident => $function:ident),* $(,)?) => {
        $(
            #[doc = concat!("The ", stringify!($function), " function's bootstrap.")]
            pub const $name: Bootstrap = Bootstrap {
                function: Function::$function,
                ports: {
                    fn ports(aws: &'static AwsPorts) -> Ports<'static> {
                        const M: Calls = Function::$function.uses();
                        // Made once per process, which lives as long as the function.
                        let select: &'static Select<'static, AwsPorts, M> =
                            Box::leak(Box::new(Select::new(aws, Function::$function.name())));
                        select.ports(&SystemClock)
                    }
                    ports
                },
            };
        )*
        /// Every stage function's bootstrap (the tests; a function's `main` names its own).
        pub const BOOTSTRAPS: [Bootstrap; Function::ALL.len()] = [$($name),*];
    };
}

bootstraps! {
    LAUNCH_BUILDER => LaunchBuilder,
    CUSTOMIZE => Customize,
    SNAPSHOT => Snapshot,
    TEST_IMAGE => TestImage,
    DISTRIBUTE => Distribute,
    CLEANUP => Cleanup,
    WAKE => Wake,
}

/// Runs a stage function until the runtime stops it.
pub async fn run(bootstrap: Bootstrap) -> Result<(), lambda_runtime::Error> {
    serve(bootstrap, |_| None).await
}

/// Runs the cleanup function: the stage's operations, and the reaper for the "Step Functions
/// Execution Status Change" events of the stack's executions that ended outside kiln's Catch
/// (`aws::reaper`, the only function that links DescribeExecution).
pub async fn run_cleanup() -> Result<(), lambda_runtime::Error> {
    serve(CLEANUP, |aws| {
        let machine = std::env::var(env::STATE_MACHINE).ok();
        Some(crate::aws::reaper::Reaper::new(aws, machine))
    })
    .await
}

async fn serve(
    bootstrap: Bootstrap,
    reaper: impl FnOnce(&'static AwsPorts) -> Option<crate::aws::reaper::Reaper>,
) -> Result<(), lambda_runtime::Error> {
    init_logs();
    let config = Config::from_env()?;
    let aws: &'static AwsPorts = Box::leak(Box::new(AwsPorts::new(
        config.settings.clone(),
        sdk_config(&config.settings.region),
    )));
    let function = bootstrap.function;
    let ports = &*Box::leak(Box::new((bootstrap.ports)(aws)));
    let reaper: Option<&'static crate::aws::reaper::Reaper> =
        reaper(aws).map(|r| &*Box::leak(Box::new(r)));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Json>| async move {
        let reaping = reaper.filter(|_| crate::aws::reaper::is_status_change(&event.payload));
        let op = match reaping {
            Some(_) => "reap",
            None => event.payload.get("op").and_then(Json::as_str).unwrap_or("-"),
        }
        .to_string();
        let result = match reaping {
            Some(r) => r.on_event(ports, &event.payload).await,
            None => handle(ports, function, event.payload).await,
        };
        match &result {
            Ok(_) => tracing::info!(stage = function.name(), op = op.as_str(), "done"),
            Err(e) => tracing::error!(stage = function.name(), op = op.as_str(), error_type = e.error_type(), error = %e, "failed"),
        }
        result.map_err(LambdaError)
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bootstrap refuses, before any AWS request, a call its function does not declare.
    #[test]
    fn a_bootstrap_refuses_the_calls_its_function_does_not_declare() {
        let aws: &'static AwsPorts = Box::leak(Box::new(AwsPorts::new(
            Settings {
                table: "t".into(),
                bucket: "b".into(),
                event_bus: "default".into(),
                region: "us-east-1".into(),
                stack: None,
                instance_profile: None,
            },
            aws_config::SdkConfig::builder().build(),
        )));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for (b, f) in BOOTSTRAPS.iter().zip(Function::ALL) {
            assert_eq!(b.function, f);
            let ports = (b.ports)(aws);
            if f == Function::Distribute {
                // It publishes image ids to parameters (declared; the call would go to AWS).
                assert_ne!(f.uses() & crate::ports::calls::PARAMETERS_PUT, 0);
            } else {
                let refused = rt
                    .block_on(ports.parameters.put("us-east-1", "/p", "v"))
                    .expect_err("no function writes parameters but distribute");
                assert_eq!(refused.error_type(), "Kiln.Internal");
                assert_eq!(
                    refused.to_string(),
                    format!(
                        "the {} function does not call parameters.put (declare it in Function::uses)",
                        f.name()
                    )
                );
            }
        }
    }
}
