//! The roles AWS services act as for the stack, evaluated as AWS evaluates them.
//!
//! Step Functions invokes each Task's function as the state machine's role, and EventBridge
//! Scheduler starts an execution as the schedule's role. In the rehearsal the executions run in
//! kiln's engine, so neither call would reach an IAM evaluator by itself: the rehearsal's Task
//! delivery (`rehearsal::Bootstraps`) first sends Lambda an Invoke with `InvocationType: DryRun`
//! signed with the state machine role's credentials, and `Rehearsal::fire_schedule` sends
//! StartExecution signed with the schedule's role's. Both are decided by the same evaluator as
//! every function's call (tests/rehearsal/moto_server.py); a refused invocation fails the Task
//! with AWS's `Lambda.AWSLambdaException` (AccessDeniedException in its cause), which the
//! state machine's Retry and Catch then see.
//!
//! Without this, deleting the state machine's grant to invoke the cleanup function passed every
//! test; on AWS every failed build would then leak its builder and hold its pipeline's lock.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;

use aws_sdk_sfn::error::ProvideErrorMetadata;
use kiln::engine::{clock::VirtualClock, definition, Engine, Status};
use serde_json::{json, Value as Json};

use crate::rehearsal::{moto_pipeline, python, runtime, Bootstraps, Rehearsal, ServiceRole};
use crate::support::run_ok;

/// Someone else's function, and a role of theirs allowed to invoke it (with credentials), made as
/// the account's administrator (the Rust SDKs the tests use have no IAM or Lambda client).
fn someone_elses_function(r: &Rehearsal) -> (String, ServiceRole) {
    let script = r##"
import io, json, zipfile, boto3
iam = boto3.client("iam", region_name="us-east-1")
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
runs_as = iam.create_role(RoleName="someone-elses-function-role", AssumeRolePolicyDocument=json.dumps(trust))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("bootstrap", "#!/bin/sh\n")
fn = boto3.client("lambda", region_name="us-east-1").create_function(
    FunctionName="someone-elses-function", Runtime="provided.al2023", Handler="bootstrap",
    Role=runs_as["Role"]["Arn"], Code={"ZipFile": buf.getvalue()})
invoker = iam.create_role(RoleName="someone-elses-invoker", AssumeRolePolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
     "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}))
iam.put_role_policy(RoleName="someone-elses-invoker", PolicyName="invoke", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "lambda:InvokeFunction",
     "Resource": fn["FunctionArn"]}]}))
c = boto3.client("sts", region_name="us-east-1").assume_role(
    RoleArn=invoker["Role"]["Arn"], RoleSessionName="invoker")["Credentials"]
print(json.dumps({"function": fn["FunctionArn"], "role": invoker["Role"]["Arn"],
                  "key": c["AccessKeyId"], "secret": c["SecretAccessKey"], "token": c["SessionToken"]}))
"##;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script]).envs(r.moto.env());
    let out: Json = serde_json::from_str(&run_ok(cmd)).expect("the script prints JSON");
    let v = |k: &str| out[k].as_str().expect(k).to_string();
    (
        v("function"),
        ServiceRole::new(
            v("role"),
            r.moto.endpoint(),
            v("key"),
            v("secret"),
            v("token"),
        ),
    )
}

/// The deployed function's ARN, by logical id.
fn function_arn(r: &Rehearsal, logical: &str) -> String {
    r.functions
        .iter()
        .find(|(_, f)| f.function_name.contains(&format!("-{logical}-")))
        .map(|(arn, _)| arn.clone())
        .unwrap_or_else(|| panic!("no deployed {logical}"))
}

fn role_name(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// The evaluator's lines for `action` on `resource` by the role `arn`.
fn lines_for(r: &Rehearsal, arn: &str, action: &str, resource: &str) -> Vec<Json> {
    r.decisions()
        .into_iter()
        .filter(|d| {
            d["role"] == role_name(arn) && d["action"] == action && d["resource"] == resource
        })
        .collect()
}

#[test]
fn every_task_is_invoked_as_the_state_machines_role_and_a_failed_build_reaches_its_cleanup() {
    // GIVEN the deployed stack, a pipeline, and a component whose command fails
    let r = Rehearsal::deploy();
    let rt = runtime();
    r.apply(&moto_pipeline());
    r.inject(json!([{"role": "CustomizeFunctionRole",
                     "operation": "AmazonSSM.GetCommandInvocation", "commandStatus": "Failed"}]));

    // WHEN a build runs, each Task invoked as the state machine's role
    let out = r.execute(&rt, "al2023-moto", "refused-nothing");

    // THEN it failed at customize and was cleaned up: the cleanup function was invoked, as the
    // state machine's role, allowed by the evaluator
    assert_eq!(out.status, Status::Failed);
    assert_eq!(
        out.error.as_deref(),
        Some("Kiln.ComponentFailed"),
        "{:?}",
        out.cause
    );
    let machine = r.state_machine_role.clone();
    let mut invoked = BTreeSet::new();
    for logical in [
        "LaunchBuilderFunction",
        "CustomizeFunction",
        "CleanupFunction",
    ] {
        let lines = lines_for(
            &r,
            &machine,
            "lambda:InvokeFunction",
            &function_arn(&r, logical),
        );
        assert!(
            !lines.is_empty() && lines.iter().all(|d| d["result"] == "Allowed"),
            "the state machine's invocations of {logical}: {lines:#?}"
        );
        invoked.insert(logical);
    }
    let (evaluated, by_role) = r.assert_all_allowed();
    // AND the builder is gone and the lock free (what a refused cleanup would leave behind)
    let ec2 = aws_sdk_ec2::Client::new(&r.admin(&rt));
    let live: Vec<String> = rt
        .block_on(ec2.describe_instances().send())
        .expect("DescribeInstances")
        .reservations()
        .iter()
        .flat_map(|res| res.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    assert!(live.is_empty(), "instances left running: {live:?}");
    r.assert_lock_free(&rt, "al2023-moto", "after the failed build");

    // WHEN the state machine's role asks to invoke a function that is not the stack's
    let (theirs, their_invoker) = someone_elses_function(&r);
    let refused = r.service_roles[&machine]
        .may_invoke(&theirs)
        .expect_err("the state machine's role invoked someone else's function");
    // THEN Lambda refuses it as AWS does, and the evaluator's line says why
    assert_eq!(
        (refused.0, refused.1.as_str()),
        (403, "AccessDeniedException"),
        "{refused:?}"
    );
    let line = lines_for(&r, &machine, "lambda:InvokeFunction", &theirs);
    assert_eq!(line.len(), 1, "{line:#?}");
    assert_eq!(line[0]["result"], "ImplicitlyDenied", "{line:#?}");
    // AND the positive control: the same request on the same function by a role allowed to
    // invoke it is let through (the function exists, the request is well formed)
    their_invoker
        .may_invoke(&theirs)
        .expect("someone else's own invoker may invoke their function");
    let control = lines_for(&r, &their_invoker.arn, "lambda:InvokeFunction", &theirs);
    assert_eq!(control.len(), 1, "{control:#?}");
    assert_eq!(control[0]["result"], "Allowed", "{control:#?}");

    // WHEN a Task names that function (its bootstrap would be the cleanup's)
    let mut functions: HashMap<String, _> = r.functions.clone();
    let cleanup = functions[&function_arn(&r, "CleanupFunction")].clone();
    functions.insert(theirs.clone(), cleanup);
    let machine_def = definition::parse(&json!({
        "StartAt": "Theirs",
        "States": {
            "Theirs": {"Type": "Task", "Resource": theirs, "Parameters": {"op": "record"},
                       "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Caught"}], "End": true},
            "Caught": {"Type": "Pass", "End": true}
        }
    }))
    .expect("definition");
    let engine = Engine::new(
        Arc::new(Bootstraps(functions, None)),
        Arc::new(VirtualClock::default()),
        true,
    );
    let out = rt.block_on(engine.run(&machine_def, json!({}), "theirs"));
    // THEN the Task fails as Step Functions fails it, and the Catch sees AWS's error
    assert_eq!(out.status, Status::Succeeded, "{:?}", out.cause);
    let caught = &out.output.expect("output");
    assert_eq!(caught["Error"], "Lambda.AWSLambdaException", "{caught}");
    let cause = caught["Cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("Error Code: AccessDeniedException")
            && cause.contains("lambda:InvokeFunction"),
        "{cause}"
    );
    println!(
        "counts: {evaluated} requests evaluated ({by_role:?}), invocations of {invoked:?} allowed, \
         2 refusals asserted (direct, through a Task), 1 positive control, 0 unexpected denies"
    );
}

#[test]
fn a_schedule_starts_its_pipeline_as_the_scheduler_role_and_nothing_else() {
    // GIVEN the deployed stack and a scheduled pipeline (kiln apply made its schedule, naming the
    // stack's scheduler role)
    let r = Rehearsal::deploy();
    let rt = runtime();
    r.apply(&(moto_pipeline() + "schedule:\n  cron: cron(0 3 ? * MON *)\n"));
    let scheduler_role = r.outputs["SchedulerRoleArn"].clone();
    let ours = r.outputs["StateMachineArn"].clone();

    // WHEN the schedule fires
    let out = r.execute_scheduled(&rt, "al2023-moto", "scheduled-1");

    // THEN its StartExecution was made as the scheduler role and allowed, and the build ran
    assert_eq!(out.status, Status::Succeeded, "{:?}", out.cause);
    let lines = lines_for(&r, &scheduler_role, "states:StartExecution", &ours);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["result"], "Allowed", "{lines:#?}");
    let (evaluated, _) = r.assert_all_allowed();

    // WHEN a schedule naming the scheduler role targets another state machine of the account
    let admin = r.admin(&rt);
    let sfn = aws_sdk_sfn::Client::new(&admin);
    let theirs = rt
        .block_on(
            sfn.create_state_machine()
                .name("someone-elses-pipeline")
                .definition(r#"{"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}"#)
                .role_arn(&scheduler_role)
                .send(),
        )
        .expect("CreateStateMachine")
        .state_machine_arn()
        .to_string();
    let scheduler = aws_sdk_scheduler::Client::new(&admin);
    rt.block_on(
        scheduler
            .create_schedule()
            .name("kiln-someone-elses")
            .schedule_expression("rate(1 hour)")
            .flexible_time_window(
                aws_sdk_scheduler::types::FlexibleTimeWindow::builder()
                    .mode(aws_sdk_scheduler::types::FlexibleTimeWindowMode::Off)
                    .build()
                    .expect("window"),
            )
            .target(
                aws_sdk_scheduler::types::Target::builder()
                    .arn(&theirs)
                    .role_arn(&scheduler_role)
                    .input(r#"{"pipeline": "al2023-moto", "trigger": {"kind": "schedule"}}"#)
                    .build()
                    .expect("target"),
            )
            .send(),
    )
    .expect("CreateSchedule");
    let refused = r
        .fire_schedule(&rt, "kiln-someone-elses", "theirs-1")
        .expect_err("the scheduler role started someone else's state machine");
    // THEN Step Functions refuses it as AWS does, and the evaluator's line says why
    assert!(refused.starts_with("AccessDeniedException: "), "{refused}");
    let line = lines_for(&r, &scheduler_role, "states:StartExecution", &theirs);
    assert_eq!(line.len(), 1, "{line:#?}");
    assert_eq!(line[0]["result"], "ImplicitlyDenied", "{line:#?}");
    // AND the positive control: the administrator's same StartExecution of that state machine
    // is let through (it exists, the request is well formed)
    let started = rt.block_on(
        sfn.start_execution()
            .state_machine_arn(&theirs)
            .input(r#"{"pipeline": "al2023-moto", "trigger": {"kind": "schedule"}}"#)
            .send(),
    );
    if let Err(e) = &started {
        panic!("the administrator's StartExecution: {:?} {e:?}", e.code());
    }
    println!(
        "counts: {evaluated} requests evaluated, 1 schedule start allowed, 1 refusal asserted, \
         1 positive control, 0 unexpected denies"
    );
}

/// The console input the README documents (infra/events/start-manual.json), exactly as written:
/// started through the deployed stack's state machine (StartExecution) and run, it builds the
/// example's pipeline. moto cannot have that pipeline's subnet, security group, instance profile
/// and launch template, so the pipeline applied under the example's name is its moto variant.
#[test]
fn the_documented_console_input_starts_a_build_of_the_deployed_stack() {
    // GIVEN the deployed stack, the documented input, and the pipeline it names applied
    let r = Rehearsal::deploy();
    let rt = runtime();
    let text =
        std::fs::read_to_string(crate::support::repo().join("infra/events/start-manual.json"))
            .expect("infra/events/start-manual.json");
    let input: Json = serde_json::from_str(&text).expect("the documented input is JSON");
    let pipeline = input["pipeline"]
        .as_str()
        .expect("it names a pipeline")
        .to_string();
    let example =
        std::fs::read_to_string(crate::support::repo().join("examples/aws-al2023/pipeline.yaml"))
            .expect("the example");
    assert!(
        example.contains(&format!("\nname: {pipeline}\n")),
        "the documented input names {pipeline}, not the example's pipeline"
    );
    r.apply(&moto_pipeline().replace("name: al2023-moto", &format!("name: {pipeline}")));

    // WHEN it is started through the deployed state machine, as the console starts it
    let sfn = aws_sdk_sfn::Client::new(&r.admin(&rt));
    let started = rt
        .block_on(
            sfn.start_execution()
                .state_machine_arn(&r.outputs["StateMachineArn"])
                .name("console-1")
                .input(&text)
                .send(),
        )
        .expect("StartExecution with the documented input");
    assert!(started.execution_arn().ends_with(":console-1"));
    let out = r.execute_input(&rt, input, "console-1");

    // THEN the build ran to AVAILABLE with the trigger the input gave, every request authorized
    assert_eq!(
        out.status,
        Status::Succeeded,
        "{:?} {:?}",
        out.error,
        out.cause
    );
    r.assert_all_allowed();
    let builds = rt
        .block_on(r.store_ports(&rt).ports().store.builds(&pipeline))
        .expect("builds");
    let b = builds
        .iter()
        .find(|b| b.request_id.as_deref() == Some("console-1"))
        .expect("the build is recorded");
    assert_eq!(
        b.status,
        kiln::model::build::BuildStatus::Available,
        "{b:?}"
    );
    r.assert_lock_free(&rt, &pipeline, "after the console's build");
}

/// Deployed with every optional parameter (a notification address, Amazon's Amazon Linux updates
/// topic, a custom event bus), every resource whose Condition then holds exists: in the stack as
/// moto's CloudFormation made it, or made by deploy.py through the API as CloudFormation would
/// (deploy.py fails on any other that is missing, so none is excused), and each is really there.
#[test]
fn the_stack_deploys_with_every_optional_parameter_and_every_conditional_resource_exists() {
    // GIVEN the template, and every optional parameter set
    let bus = "kiln-all-options";
    let topic = "arn:aws:sns:us-east-1:137112412989:amazon-linux-2023-ami-updates";
    let dir = tempfile::tempdir().expect("dir");
    let template: Json = serde_json::from_str(
        &std::fs::read_to_string(crate::rehearsal::expand(dir.path())).expect("expanded"),
    )
    .expect("JSON");
    let conditional: BTreeSet<String> = template["Resources"]
        .as_object()
        .expect("resources")
        .iter()
        .filter(|(_, r)| r.get("Condition").is_some())
        .map(|(n, _)| n.clone())
        .collect();
    assert!(conditional.len() >= 5, "{conditional:?}");

    // WHEN the stack is deployed with them
    let r = Rehearsal::deploy_with(&json!({
        "EventBusName": bus,
        "NotificationEmail": "builds@example.com",
        "AmazonLinuxUpdatesTopicArn": topic,
    }));

    // THEN each conditional resource is in the stack or was made by the API
    let rt = runtime();
    let cfn = aws_sdk_cloudformation::Client::new(&r.admin(&rt));
    let in_stack: BTreeSet<String> = rt
        .block_on(
            cfn.list_stack_resources()
                .stack_name(crate::rehearsal::STACK)
                .send(),
        )
        .expect("ListStackResources")
        .stack_resource_summaries()
        .iter()
        .filter_map(|s| s.logical_resource_id().map(str::to_string))
        .collect();
    let made: BTreeSet<String> = r.made_by_api().iter().cloned().collect();
    for name in &conditional {
        assert!(
            in_stack.contains(name) || made.contains(name),
            "{name}: its condition holds and it is neither in the stack nor made by the API"
        );
    }
    // AND each is really there: the subscription of the trigger to Amazon's topic, the
    // notification topic with its e-mail subscription and its policy, the rule on the custom bus
    let trigger = r.outputs["TriggerFunctionArn"].clone();
    let script = r#"
import json, sys, boto3
topic, trigger, bus = sys.argv[1:4]
amazon = boto3.client("sns", region_name="us-east-1")
amazon.meta.events.register("before-sign.sns.*", lambda request, **_: request.headers.__setitem__("x-moto-account-id", topic.split(":")[4]))
subs = amazon.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
ours = boto3.client("sns", region_name="us-east-1")
topics = [t["TopicArn"] for t in ours.list_topics()["Topics"]]
attrs = {t: ours.get_topic_attributes(TopicArn=t)["Attributes"] for t in topics}
mails = {t: [s["Endpoint"] for s in ours.list_subscriptions_by_topic(TopicArn=t)["Subscriptions"]] for t in topics}
rules = [x["Name"] for x in boto3.client("events", region_name="us-east-1").list_rules(EventBusName=bus)["Rules"]]
policy = json.loads(boto3.client("lambda", region_name="us-east-1").get_policy(FunctionName=trigger)["Policy"])
print(json.dumps({"subs": subs, "attrs": attrs, "mails": mails, "rules": rules, "policy": policy}))
"#;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script, topic, &trigger, bus])
        .envs(r.moto.env());
    let seen: Json = serde_json::from_str(&run_ok(cmd)).expect("the script prints JSON");
    let subs = seen["subs"].as_array().expect("subscriptions");
    assert!(
        subs.iter()
            .any(|s| s["Protocol"] == "lambda" && s["Endpoint"] == trigger.as_str()),
        "the trigger is not subscribed to {topic}: {subs:#?}"
    );
    let notification = seen["mails"]
        .as_object()
        .expect("topics")
        .iter()
        .find(|(_, m)| {
            m.as_array()
                .is_some_and(|m| m.iter().any(|e| e == "builds@example.com"))
        })
        .map(|(t, _)| t.clone())
        .unwrap_or_else(|| panic!("no topic mails builds@example.com: {seen:#}"));
    let attrs = &seen["attrs"][&notification];
    assert!(
        attrs["Policy"]
            .as_str()
            .is_some_and(|p| p.contains("events.amazonaws.com")),
        "the notification topic's policy: {attrs:#}"
    );
    assert!(
        attrs["KmsMasterKeyId"]
            .as_str()
            .is_some_and(|k| !k.is_empty() && k != "alias/aws/sns"),
        "the notification topic's key: {attrs:#}"
    );
    let rules = seen["rules"].as_array().expect("rules");
    assert!(
        rules
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.ends_with("-notify"))),
        "no notification rule on {bus}: {rules:?}"
    );
    let statements = seen["policy"]["Statement"].as_array().expect("statements");
    assert!(
        statements
            .iter()
            .any(|s| s.to_string().contains("sns.amazonaws.com") && s.to_string().contains(topic)),
        "the trigger does not let {topic} invoke it: {statements:#?}"
    );
}
