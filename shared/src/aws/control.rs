//! The control plane of a deployed stack: what `kiln apply`, `kiln delete`, `kiln start`,
//! `kiln cancel` and the trigger function do. The stack is found by name (CloudFormation
//! outputs); pipelines are stored as immutable versions in its table, components uploaded to its
//! bucket, schedules created in EventBridge Scheduler (which honours the pipeline's time zone —
//! EventBridge rules only know UTC) and parent-image rules in EventBridge.

use serde_json::{json, Value as Json};

use super::{sdk_error, AwsPorts, Settings};
use crate::errors::{ErrorKind, StageError};
use crate::model::build::{Build, BuildStatus};
use crate::model::pipeline::Parent;
use crate::ports::{PipelineRecord, Store};

/// What a deployed stack's outputs say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub name: String,
    pub region: String,
    pub table: String,
    pub bucket: String,
    pub state_machine_arn: String,
    /// The role EventBridge Scheduler assumes to start executions.
    pub scheduler_role_arn: Option<String>,
    /// The trigger function (parent-image events).
    pub trigger_function_arn: Option<String>,
    pub event_bus: String,
}

fn invalid(message: impl Into<String>) -> StageError {
    StageError::new(ErrorKind::InvalidPipeline, message)
}

/// The name of a pipeline's schedule (and the prefix of its rules): `kiln-<pipeline>`.
pub fn schedule_name(pipeline: &str) -> String {
    format!("kiln-{pipeline}")
}

/// AWS public parameters (`/aws/service/…`) send no change events to the account.
pub fn is_public_parameter(name: &str) -> bool {
    name.starts_with("/aws/service/")
}

/// Stack `name` as CloudFormation describes it.
async fn described(
    config: &aws_config::SdkConfig,
    name: &str,
) -> Result<aws_sdk_cloudformation::types::Stack, StageError> {
    let out = aws_sdk_cloudformation::Client::new(config)
        .describe_stacks()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| {
            let e = sdk_error("DescribeStacks", e);
            invalid(format!(
                "stack `{name}`: {e} (deploy it with `make deploy`)"
            ))
        })?;
    out.stacks()
        .first()
        .cloned()
        .ok_or_else(|| invalid(format!("stack `{name}` does not exist")))
}

/// What stack `name` lets its pipelines' SSM parameters be (`kiln validate --stack`): its
/// `ImageParameterPrefix` parameter as CloudFormation describes the deployed stack.
pub async fn stack_grants(
    config: &aws_config::SdkConfig,
    name: &str,
) -> Result<crate::model::load::StackGrants, StageError> {
    let stack = described(config, name).await?;
    // The parameter as deployed, or the output the template also gives it as.
    let prefix = stack
        .parameters()
        .iter()
        .find(|p| p.parameter_key() == Some("ImageParameterPrefix"))
        .and_then(|p| p.parameter_value())
        .or_else(|| {
            stack
                .outputs()
                .iter()
                .find(|o| o.output_key() == Some("ImageParameterPrefix"))
                .and_then(|o| o.output_value())
        })
        .ok_or_else(|| {
            invalid(format!(
                "stack `{name}` has no ImageParameterPrefix parameter: it predates scoped parameters (update it with `make deploy`)"
            ))
        })?;
    Ok(crate::model::load::StackGrants {
        stack: name.to_string(),
        parameter_prefix: prefix.to_string(),
    })
}

impl Stack {
    /// Reads stack `name`'s outputs.
    pub async fn describe(config: &aws_config::SdkConfig, name: &str) -> Result<Stack, StageError> {
        let stack = described(config, name).await?;
        let output = |key: &str| {
            stack
                .outputs()
                .iter()
                .find(|o| o.output_key() == Some(key))
                .and_then(|o| o.output_value())
                .map(str::to_string)
        };
        let need = |key: &str| {
            output(key).ok_or_else(|| {
                invalid(format!(
                    "stack `{name}` has no output {key}; is it a kiln stack (infra/template.yaml)?"
                ))
            })
        };
        Ok(Stack {
            name: name.to_string(),
            region: config
                .region()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "us-east-1".into()),
            table: need("TableName")?,
            bucket: need("ArtifactsBucketName")?,
            state_machine_arn: need("StateMachineArn")?,
            scheduler_role_arn: output("SchedulerRoleArn"),
            trigger_function_arn: output("TriggerFunctionArn"),
            event_bus: output("EventBusName").unwrap_or_else(|| "default".into()),
        })
    }

    pub fn settings(&self) -> Settings {
        Settings {
            table: self.table.clone(),
            bucket: self.bucket.clone(),
            event_bus: self.event_bus.clone(),
            region: self.region.clone(),
            stack: (!self.name.is_empty()).then(|| self.name.clone()),
            instance_profile: None,
        }
    }

    /// The ARN of execution `name` of the stack's state machine.
    pub fn execution_arn(&self, name: &str) -> String {
        format!(
            "{}:{name}",
            self.state_machine_arn
                .replacen(":stateMachine:", ":execution:", 1)
        )
    }
}

/// The control-plane clients for one stack.
#[derive(Debug)]
pub struct Control {
    pub stack: Stack,
    pub ports: AwsPorts,
    // Made at first use: the trigger function's bootstrap links only what it calls.
    config: aws_config::SdkConfig,
    sfn: std::sync::OnceLock<aws_sdk_sfn::Client>,
    scheduler: std::sync::OnceLock<aws_sdk_scheduler::Client>,
    events: std::sync::OnceLock<aws_sdk_eventbridge::Client>,
}

/// The execution input that starts a build.
pub fn start_input(pipeline: &str, kind: &str, detail: &str) -> Json {
    json!({"pipeline": pipeline, "trigger": {"kind": kind, "detail": detail}})
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    pub pipeline: String,
    pub version: String,
    pub components: Vec<String>,
    pub schedule: Option<String>,
    pub rules: Vec<String>,
}

impl Control {
    /// The stack `name`, from the environment's AWS configuration.
    pub async fn connect(name: &str) -> Result<Control, StageError> {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let stack = Stack::describe(&config, name).await?;
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(stack.region.clone()))
            .load()
            .await;
        Ok(Control::new(stack, &config))
    }

    pub fn new(stack: Stack, config: &aws_config::SdkConfig) -> Control {
        Control {
            ports: AwsPorts::new(stack.settings(), config.clone()),
            config: config.clone(),
            sfn: Default::default(),
            scheduler: Default::default(),
            events: Default::default(),
            stack,
        }
    }

    fn sfn(&self) -> &aws_sdk_sfn::Client {
        self.sfn
            .get_or_init(|| aws_sdk_sfn::Client::new(&self.config))
    }

    fn scheduler(&self) -> &aws_sdk_scheduler::Client {
        self.scheduler
            .get_or_init(|| aws_sdk_scheduler::Client::new(&self.config))
    }

    fn events(&self) -> &aws_sdk_eventbridge::Client {
        self.events
            .get_or_init(|| aws_sdk_eventbridge::Client::new(&self.config))
    }

    /// Stores the pipeline version, uploads its components, creates or updates its schedule and
    /// its parent-image rule (or removes them when the pipeline no longer has them).
    pub async fn apply(&self, record: &PipelineRecord) -> Result<Applied, StageError> {
        let p = &record.pipeline;
        self.ports.put_pipeline(record).await?;
        let mut components = Vec::new();
        for (i, c) in record.components.iter().chain(&record.tests).enumerate() {
            let key = format!("pipelines/{}/{}/components/{i}.json", p.name, p.version);
            let body = serde_json::to_vec_pretty(&json!({
                "name": c.name, "parameters": c.parameters, "document": c.document
            }))
            .map_err(|e| invalid(e.to_string()))?;
            self.ports.put(&key, body).await?;
            components.push(key);
        }
        let name = schedule_name(&p.name);
        let cron = p.schedule.as_ref().and_then(|s| s.cron.clone());
        let schedule = match (&cron, p.schedule.as_ref()) {
            (Some(cron), Some(s)) => {
                let input = start_input(&p.name, "schedule", &name);
                self.put_schedule(&name, cron, &s.timezone, &input).await?;
                Some(name.clone())
            }
            _ => {
                self.delete_schedule(&name).await?;
                None
            }
        };
        let mut rules = Vec::new();
        let rule = format!("{name}-parent");
        let check = format!("{name}-parent-check");
        match &p.parent {
            Parent::SsmParameter(param) if !is_public_parameter(param) => {
                self.put_parameter_rule(&rule, &p.name, param).await?;
                rules.push(rule);
                self.delete_schedule(&check).await?;
            }
            Parent::SsmParameter(param) => {
                // No events for public parameters: an hourly check, cheap with onChange.
                let input = start_input(&p.name, "event", &format!("hourly check of {param}"));
                self.put_schedule(&check, "rate(1 hour)", "UTC", &input)
                    .await?;
                rules.push(check);
                self.delete_rule(&rule).await?;
            }
            _ => {
                self.delete_rule(&rule).await?;
                self.delete_schedule(&check).await?;
            }
        }
        Ok(Applied {
            pipeline: p.name.clone(),
            version: p.version.clone(),
            components,
            schedule,
            rules,
        })
    }

    /// Removes the pipeline's schedule and rules (its builds and images stay).
    pub async fn delete(&self, pipeline: &str) -> Result<(), StageError> {
        let name = schedule_name(pipeline);
        self.delete_schedule(&name).await?;
        self.delete_schedule(&format!("{name}-parent-check"))
            .await?;
        self.delete_rule(&format!("{name}-parent")).await
    }

    async fn put_schedule(
        &self,
        name: &str,
        expression: &str,
        timezone: &str,
        input: &Json,
    ) -> Result<(), StageError> {
        use aws_sdk_scheduler::types::{FlexibleTimeWindow, FlexibleTimeWindowMode, Target};
        let role = self.stack.scheduler_role_arn.clone().ok_or_else(|| {
            invalid(format!(
                "stack `{}` has no SchedulerRoleArn output; redeploy it",
                self.stack.name
            ))
        })?;
        let target = Target::builder()
            .arn(&self.stack.state_machine_arn)
            .role_arn(role)
            .input(input.to_string())
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let window = FlexibleTimeWindow::builder()
            .mode(FlexibleTimeWindowMode::Off)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let exists = self
            .scheduler()
            .get_schedule()
            .name(name)
            .send()
            .await
            .is_ok();
        if exists {
            self.scheduler()
                .update_schedule()
                .name(name)
                .schedule_expression(expression)
                .schedule_expression_timezone(timezone)
                .flexible_time_window(window)
                .target(target)
                .state(aws_sdk_scheduler::types::ScheduleState::Enabled)
                .send()
                .await
                .map_err(|e| sdk_error("UpdateSchedule", e))?;
        } else {
            self.scheduler()
                .create_schedule()
                .name(name)
                .schedule_expression(expression)
                .schedule_expression_timezone(timezone)
                .flexible_time_window(window)
                .target(target)
                .send()
                .await
                .map_err(|e| sdk_error("CreateSchedule", e))?;
        }
        Ok(())
    }

    async fn delete_schedule(&self, name: &str) -> Result<(), StageError> {
        if self
            .scheduler()
            .get_schedule()
            .name(name)
            .send()
            .await
            .is_ok()
        {
            self.scheduler()
                .delete_schedule()
                .name(name)
                .send()
                .await
                .map_err(|e| sdk_error("DeleteSchedule", e))?;
        }
        Ok(())
    }

    async fn put_parameter_rule(
        &self,
        rule: &str,
        pipeline: &str,
        parameter: &str,
    ) -> Result<(), StageError> {
        let function = self.stack.trigger_function_arn.clone().ok_or_else(|| {
            invalid(format!(
                "stack `{}` has no TriggerFunctionArn output; redeploy it",
                self.stack.name
            ))
        })?;
        let pattern = json!({
            "source": ["aws.ssm"],
            "detail-type": ["Parameter Store Change"],
            "detail": {"name": [parameter], "operation": ["Create", "Update"]}
        });
        self.events()
            .put_rule()
            .name(rule)
            .event_bus_name(super::AWS_EVENTS_BUS)
            .event_pattern(pattern.to_string())
            .description(format!("kiln: rebuild {pipeline} when {parameter} changes"))
            .send()
            .await
            .map_err(|e| sdk_error("PutRule", e))?;
        let transformer = aws_sdk_eventbridge::types::InputTransformer::builder()
            .input_template(format!(
                "{{\"pipeline\": {}, \"event\": <aws.events.event.json>}}",
                json!(pipeline)
            ))
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let target = aws_sdk_eventbridge::types::Target::builder()
            .id("trigger")
            .arn(function)
            .input_transformer(transformer)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        self.events()
            .put_targets()
            .rule(rule)
            .event_bus_name(super::AWS_EVENTS_BUS)
            .targets(target)
            .send()
            .await
            .map_err(|e| sdk_error("PutTargets", e))?;
        Ok(())
    }

    async fn delete_rule(&self, rule: &str) -> Result<(), StageError> {
        let exists = self
            .events()
            .describe_rule()
            .name(rule)
            .event_bus_name(super::AWS_EVENTS_BUS)
            .send()
            .await
            .is_ok();
        if exists {
            self.events()
                .remove_targets()
                .rule(rule)
                .event_bus_name(super::AWS_EVENTS_BUS)
                .ids("trigger")
                .send()
                .await
                .map_err(|e| sdk_error("RemoveTargets", e))?;
            self.events()
                .delete_rule()
                .name(rule)
                .event_bus_name(super::AWS_EVENTS_BUS)
                .send()
                .await
                .map_err(|e| sdk_error("DeleteRule", e))?;
        }
        Ok(())
    }

    /// Starts an execution named `name` (a started execution of the same name is the same
    /// start); returns its ARN and whether this call started it.
    pub async fn start(&self, name: &str, input: &Json) -> Result<(String, bool), StageError> {
        // Started before (running or ended): the same start. A concurrent duplicate is caught by
        // StartExecution itself (same name and input while running: the same execution).
        let existing = self.stack.execution_arn(name);
        if self
            .sfn()
            .describe_execution()
            .execution_arn(&existing)
            .send()
            .await
            .is_ok()
        {
            return Ok((existing, false));
        }
        match self
            .sfn()
            .start_execution()
            .state_machine_arn(&self.stack.state_machine_arn)
            .name(name)
            .input(input.to_string())
            .send()
            .await
        {
            Ok(out) => Ok((out.execution_arn().to_string(), true)),
            Err(e)
                if aws_sdk_sfn::error::ProvideErrorMetadata::code(&e)
                    == Some("ExecutionAlreadyExists") =>
            {
                Ok((self.stack.execution_arn(name), false))
            }
            Err(e) => Err(sdk_error("StartExecution", e)),
        }
    }

    /// The execution's status (`RUNNING`, `SUCCEEDED`, `FAILED`, `ABORTED`, …) and output.
    pub async fn execution(&self, arn: &str) -> Result<(String, Option<String>), StageError> {
        let out = self
            .sfn()
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeExecution", e))?;
        Ok((
            out.status().as_str().to_string(),
            out.output().map(str::to_string),
        ))
    }

    /// A build by id (or unique prefix), in any pipeline.
    pub async fn find_build(&self, id: &str) -> Result<Build, StageError> {
        crate::model::build::find_by_prefix(self.ports.all_builds().await?, id)
            .map_err(invalid)?
            .ok_or_else(|| invalid(format!("no build `{id}` in stack {}", self.stack.name)))
    }

    /// Stops the build's execution and runs its cleanup (instances terminated, partial images
    /// removed, CANCELLED, lock released) with the same code as the cleanup function.
    pub async fn cancel(&self, build: &Build, who: &str) -> Result<Build, StageError> {
        if build.status.is_final() {
            return Err(invalid(format!(
                "build {} is {} already",
                build.id,
                build.status.as_str()
            )));
        }
        if let Some(name) = &build.request_id {
            let arn = self.stack.execution_arn(name);
            if let Err(e) = self
                .sfn()
                .stop_execution()
                .execution_arn(&arn)
                .error("Kiln.Cancelled")
                .cause(format!("cancelled by {who}"))
                .send()
                .await
            {
                if aws_sdk_sfn::error::ProvideErrorMetadata::code(&e)
                    != Some("ExecutionDoesNotExist")
                {
                    return Err(sdk_error("StopExecution", e));
                }
            }
        }
        let ports = self.ports.ports();
        let done = crate::stages::cleanup::run(
            &ports,
            build.clone(),
            ErrorKind::Cancelled.error_type(),
            &format!("cancelled by {who}"),
        )
        .await?;
        debug_assert!(done.status == BuildStatus::Cancelled || done.status.is_final());
        Ok(done)
    }
}

/// Amazon Linux publishes its AMI updates to SNS topics; a notification from one (subscribed by
/// the stack) is news for every pipeline whose parent is an Amazon Linux public parameter.
pub const AMAZON_LINUX_PARAMETERS: &str = "/aws/service/ami-amazon-linux-latest/";

/// The trigger function: a parent-image event becomes StartExecution calls, each named after
/// the pipeline and the fingerprint the new parent gives, so the same change never starts two
/// builds. Events: `{"pipeline", "event"}` from the rule `kiln apply` made, or an SNS
/// notification (`{"Records": [{"Sns": …}]}`) from an Amazon Linux AMI update topic, which
/// concerns every applied pipeline built on an Amazon Linux public parameter.
pub async fn trigger(control: &Control, event: &Json) -> Result<Json, StageError> {
    let Some(records) = event["Records"].as_array() else {
        return trigger_pipeline(control, event).await;
    };
    let subject = records
        .iter()
        .filter_map(|r| {
            r["Sns"]["Subject"]
                .as_str()
                .or(r["Sns"]["TopicArn"].as_str())
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut results = Vec::new();
    for name in control.ports.pipeline_names().await? {
        let Some(record) = control.ports.pipeline(&name).await? else {
            continue;
        };
        if matches!(&record.pipeline.parent, Parent::SsmParameter(p) if p.starts_with(AMAZON_LINUX_PARAMETERS))
        {
            let event = json!({"pipeline": name, "event": {"detail": {"name": format!("Amazon Linux update ({subject})")}}});
            results.push(trigger_pipeline(control, &event).await?);
        }
    }
    Ok(json!({"pipelines": results}))
}

/// The port calls the trigger function's code makes beside its own: the pipeline's parent image
/// resolved as the build will resolve it (a parameter, an image filter or name).
pub const TRIGGER_CALLS: crate::ports::Calls = {
    use crate::ports::calls::*;
    PARAMETERS_GET | COMPUTE_LATEST_IMAGE | COMPUTE_IMAGE_NAMED
};

async fn trigger_pipeline(control: &Control, event: &Json) -> Result<Json, StageError> {
    let ports = &control.ports;
    let pipeline = event["pipeline"]
        .as_str()
        .ok_or_else(|| invalid("trigger: the event names no pipeline"))?;
    let record = ports
        .pipeline(pipeline)
        .await?
        .ok_or_else(|| invalid(format!("trigger: pipeline `{pipeline}` is not applied")))?;
    let region = record.pipeline.home_region().to_string();
    let parent = crate::stages::launch_builder::resolve_parent(
        &crate::ports::Select::<AwsPorts, TRIGGER_CALLS>::new(ports, "trigger")
            .ports(&crate::ports::SystemClock),
        &record,
        &region,
    )
    .await?;
    let fp = crate::model::fingerprint::of_record(&record, parent.as_str());
    let detail = event["event"]["detail"]["name"]
        .as_str()
        .map(|n| format!("{n}: parent {parent}"))
        .unwrap_or_else(|| format!("parent {parent}"));
    let digest: String = fp
        .as_str()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(20)
        .collect();
    let base: String = pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    let name = format!("{base}-{digest}");
    let input = start_input(pipeline, "event", &detail);
    let (arn, started) = control.start(&name, &input).await?;
    Ok(json!({"executionArn": arn, "started": started, "deduplicated": !started}))
}
