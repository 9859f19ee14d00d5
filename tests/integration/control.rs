//! A deployed stack's control plane on a moto server: `kiln apply --stack` (schedule in the
//! pipeline's time zone, parent-image rule, components uploaded), the trigger function's
//! deduplication, `kiln start`, `kiln status`, `kiln builds list --stack`, `kiln cancel` (the
//! execution stops, cleanup runs, the build ends CANCELLED), `kiln delete --stack`.
//!
//! All of it against the stack deployed by the rehearsal (tests/integration/rehearsal.rs): the
//! expanded template in moto's CloudFormation, the trigger and launch-builder functions run as
//! their real bootstraps under their own roles, every request they make authorized by the IAM
//! policy evaluator. The CLI runs as the account's administrator.

use kiln::aws::control::Control;
use kiln::model::build::{Build, BuildStatus};
use serde_json::{json, Value as Json};

use crate::rehearsal::Rehearsal;
use crate::support::repo;

const PARAM: &str = "/images/base/latest";

#[test]
fn a_stack_applies_schedules_triggers_starts_and_cancels_pipelines() {
    // GIVEN the deployed stack
    let r = Rehearsal::deploy();
    let moto = &r.moto;
    for (k, v) in moto.env() {
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_MAX_ATTEMPTS", "2");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let config = r.admin(&rt);
    let ports = r.store_ports(&rt);
    let sfn = aws_sdk_sfn::Client::new(&config);
    let machine_arn = r.outputs["StateMachineArn"].clone();
    // AND a parent published in the account's own parameter, and a pipeline built on it
    let parent = kiln::model::build::ImageId(crate::rehearsal::publish_parent(&r, &rt, PARAM));
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("pipeline.yaml");
    let text = std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .expect("read")
        .replace(
            "ssmParameter: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            &format!("ssmParameter: {PARAM}"),
        )
        .replace(
            "../../../../examples/aws-al2023/components/harden.yaml",
            &repo().join("examples/aws-al2023/components/harden.yaml").display().to_string(),
        )
        + "schedule:\n  cron: cron(0 3 ? * MON *)\n  timezone: America/New_York\n  disableAfterFailures: 2\n";
    std::fs::write(&file, text).expect("write");

    // WHEN it is applied to the stack
    let (code, out, err) = r.kiln(&["apply", &file.display().to_string(), "--stack", "kiln"]);
    assert_eq!(code, 0, "{out}{err}");
    let applied: Json = serde_json::from_str(&out).expect("json");
    // THEN the schedule starts the state machine at 03:00 New York time with the pipeline's input
    let scheduler = aws_sdk_scheduler::Client::new(&config);
    let schedule = rt
        .block_on(scheduler.get_schedule().name("kiln-al2023-moto").send())
        .expect("schedule");
    assert_eq!(schedule.schedule_expression(), Some("cron(0 3 ? * MON *)"));
    assert_eq!(
        schedule.schedule_expression_timezone(),
        Some("America/New_York")
    );
    let target = schedule.target().expect("target");
    assert_eq!(target.arn(), machine_arn);
    let input: Json = serde_json::from_str(target.input().unwrap_or("{}")).expect("input");
    assert_eq!(input["pipeline"], "al2023-moto");
    assert_eq!(input["trigger"]["kind"], "schedule");
    // AND a rule sends changes of the parent parameter to the trigger function
    let events = aws_sdk_eventbridge::Client::new(&config);
    let rule = rt
        .block_on(
            events
                .describe_rule()
                .name("kiln-al2023-moto-parent")
                .send(),
        )
        .expect("rule");
    let pattern: Json =
        serde_json::from_str(rule.event_pattern().unwrap_or("{}")).expect("pattern");
    assert_eq!(pattern["detail"]["name"], json!([PARAM]));
    assert_eq!(pattern["detail-type"], json!(["Parameter Store Change"]));
    let targets = rt
        .block_on(
            events
                .list_targets_by_rule()
                .rule("kiln-al2023-moto-parent")
                .send(),
        )
        .expect("targets");
    assert_eq!(targets.targets()[0].arn(), r.outputs["TriggerFunctionArn"]);
    assert_eq!(applied["components"].as_array().map(Vec::len), Some(2));

    // WHEN the parameter changes and the event reaches the trigger function, twice
    let control = rt.block_on(Control::connect("kiln")).expect("control");
    let event = json!({"pipeline": "al2023-moto", "event": {
        "source": "aws.ssm", "detail-type": "Parameter Store Change",
        "detail": {"name": PARAM, "operation": "Update", "type": "String"}}});
    let first = trigger(&r, &event);
    let again = trigger(&r, &event);
    r.assert_all_allowed();
    // THEN one execution started; the repeat was recognised
    assert_eq!(first["started"], true, "{first}");
    assert_eq!(again["deduplicated"], true, "{again}");
    assert_eq!(first["executionArn"], again["executionArn"]);
    let executions = rt
        .block_on(sfn.list_executions().state_machine_arn(&machine_arn).send())
        .expect("executions");
    assert_eq!(executions.executions().len(), 1);

    // GIVEN a second pipeline on the Amazon Linux public parameter (no events for it)
    let follow = std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .expect("read")
        .replace("name: al2023-moto", "name: al2023-follow")
        .replace(
            "../../../../examples/aws-al2023/components/harden.yaml",
            &repo()
                .join("examples/aws-al2023/components/harden.yaml")
                .display()
                .to_string(),
        );
    let follow_file = dir.path().join("follow.yaml");
    std::fs::write(&follow_file, follow).expect("write");
    let (code, out, err) = r.kiln(&[
        "apply",
        &follow_file.display().to_string(),
        "--stack",
        "kiln",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // THEN it gets an hourly check instead of a rule
    let check = rt
        .block_on(
            scheduler
                .get_schedule()
                .name("kiln-al2023-follow-parent-check")
                .send(),
        )
        .expect("hourly check");
    assert_eq!(check.schedule_expression(), Some("rate(1 hour)"));
    assert!(rt
        .block_on(
            events
                .describe_rule()
                .name("kiln-al2023-follow-parent")
                .send()
        )
        .is_err());
    // WHEN an Amazon Linux AMI update notification arrives (SNS), twice
    let sns = json!({"Records": [{"EventSource": "aws:sns", "Sns": {
        "TopicArn": "arn:aws:sns:us-east-1:137112412989:amazon-linux-2023-ami-updates",
        "Subject": "Amazon Linux 2023 AMI Update", "Message": "{}"}}]});
    let first = trigger(&r, &sns);
    let again = trigger(&r, &sns);
    // THEN only the Amazon Linux pipeline is started, once
    assert_eq!(
        first["pipelines"].as_array().map(Vec::len),
        Some(1),
        "{first}"
    );
    assert_eq!(first["pipelines"][0]["started"], true, "{first}");
    assert_eq!(again["pipelines"][0]["deduplicated"], true, "{again}");
    let executions = rt
        .block_on(sfn.list_executions().state_machine_arn(&machine_arn).send())
        .expect("executions");
    assert_eq!(executions.executions().len(), 2);

    // WHEN a build is started by hand, and its builder launched by the LaunchBuilder function
    // (moto does not run the state machine's tasks)
    let (code, out, err) = r.kiln(&["start", "al2023-moto", "--stack", "kiln"]);
    assert_eq!(code, 0, "{out}{err}");
    let execution = out.trim().rsplit(':').next().expect("name").to_string();
    let (ok, launched) = r.invoke(
        "LaunchBuilderFunction",
        json!({"op": "start", "request": {"pipeline": "al2023-moto",
               "trigger": {"kind": "manual"}, "requestId": execution}}),
    );
    assert!(ok, "{launched}");
    let build: Build = serde_json::from_value(launched).expect("a build");
    assert_eq!(build.parent_image.as_ref(), Some(&parent));
    // AND it is listed and shown
    let (code, out, _) = r.kiln(&["builds", "list", "--stack", "kiln", "--output", "json"]);
    assert_eq!(code, 0);
    assert!(out.contains(build.id.as_str()), "{out}");
    // WHEN it is cancelled
    let (code, out, err) = r.kiln(&["cancel", &build.id.0[..20], "--stack", "kiln"]);
    // THEN the execution is aborted, cleanup ran, and the build is CANCELLED with its lock free
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("CANCELLED"), "{out}");
    let status = rt
        .block_on(
            sfn.describe_execution()
                .execution_arn(control.stack.execution_arn(&execution))
                .send(),
        )
        .expect("execution");
    assert_eq!(status.status().as_str(), "ABORTED");
    rt.block_on(async {
        let p = ports.ports();
        let stored = p
            .store
            .build("al2023-moto", &build.id)
            .await
            .expect("get")
            .expect("build");
        assert_eq!(stored.status, BuildStatus::Cancelled);
        // (raw DescribeInstances: the builder is terminated)
        let builder = build
            .builder
            .as_ref()
            .expect("builder")
            .id
            .as_str()
            .to_string();
        let state = aws_sdk_ec2::Client::new(&config)
            .describe_instances()
            .instance_ids(&builder)
            .send()
            .await
            .expect("DescribeInstances")
            .reservations()[0]
            .instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string());
        assert_eq!(state.as_deref(), Some("terminated"));
        let probe = kiln::model::build::BuildId::new_at(1);
        p.store
            .lock("al2023-moto", &probe, chrono::Utc::now(), 60)
            .await
            .expect("lock free");
    });
    let (code, out, _) = r.kiln(&["status", build.id.as_str(), "--stack", "kiln"]);
    assert_eq!(code, 0);
    assert!(out.contains("CANCELLED"), "{out}");
    // WHEN the pipeline is deleted from the stack, its schedule and rule go
    let (code, out, err) = r.kiln(&["delete", "al2023-moto", "--stack", "kiln"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(rt
        .block_on(scheduler.get_schedule().name("kiln-al2023-moto").send())
        .is_err());
    assert!(rt
        .block_on(
            events
                .describe_rule()
                .name("kiln-al2023-moto-parent")
                .send()
        )
        .is_err());
    // AND a stack that does not exist is a clear usage error
    let (code, _, err) = r.kiln(&["start", "al2023-moto", "--stack", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("stack `nope`"), "{err}");
    // AND every request the functions made was authorized by their deployed roles
    r.assert_all_allowed();
}

/// Invokes the deployed trigger function's bootstrap with an event, as EventBridge or SNS would.
fn trigger(r: &Rehearsal, event: &Json) -> Json {
    let (ok, body) = r.invoke("TriggerFunction", event.clone());
    assert!(ok, "the trigger function failed: {body}");
    body
}
