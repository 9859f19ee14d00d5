//! Events through EventBridge, as in AWS: AWS-shaped events (the samples of AWS's documentation)
//! enter the rehearsal's default bus by its test-only injection path, the DEPLOYED rules match
//! them (moto's pattern matcher), and what AWS's services do on the stack's behalf is authorized
//! as AWS authorizes it (tests/rehearsal/delivery.py): EventBridge invoking a function (its
//! resource policy, as events.amazonaws.com, with the rule's ARN), EventBridge publishing to the
//! notification topic (its policy and its key's), SNS delivering. The input transformer is
//! applied and the real bootstrap invoked with what the rule delivered. Each rule has an event it
//! must not let through; each refusal has its positive control.

use serde_json::{json, Value as Json};

use crate::rehearsal::{publish_parent, python, runtime, Rehearsal, STACK};
use crate::support::{repo, run_ok};

const PARAM: &str = "/images/base/latest";
const ACCOUNT: &str = "123456789012";

/// A request to the rehearsal server's test-only path (`/_kiln/…`, tests/rehearsal/delivery.py).
fn test_path(r: &Rehearsal, method: &str, path: &str, body: &Json) -> Json {
    use std::io::{Read, Write};
    let endpoint = r.moto.endpoint();
    let host = endpoint.strip_prefix("http://").expect("an http endpoint");
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, answer) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{out}"
    );
    serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// An AWS service's event entering the default bus: what it delivered (every rule, every target).
pub(crate) fn inject(r: &Rehearsal, event: &Json) -> Vec<Json> {
    test_path(r, "POST", "/_kiln/inject/event", &json!({ "event": event }))["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every delivery made so far (injected or put), in order.
pub(crate) fn deliveries(r: &Rehearsal) -> Vec<Json> {
    test_path(r, "GET", "/_kiln/deliveries", &json!({}))["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The deliveries made since the last drain, marked drained.
fn drained(r: &Rehearsal) -> Vec<Json> {
    test_path(r, "GET", "/_kiln/deliveries?drain=1", &json!({}))["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

impl Rehearsal {
    /// The deliveries made since the last drain, each delivered one to a Lambda function invoked
    /// on that function's bootstrap with what EventBridge or SNS delivered, as Lambda would run
    /// it: (delivery, answered without error, answer).
    pub(crate) fn deliver(&self) -> Vec<(Json, bool, Json)> {
        let drained = drained(self);
        let mut out = Vec::new();
        for d in drained {
            if d["kind"] != "lambda" || d["result"] != "Delivered" {
                continue;
            }
            let arn = d["target"].as_str().unwrap_or_default();
            let f = self
                .functions
                .get(arn)
                .cloned()
                .unwrap_or_else(|| panic!("a delivery to {arn}, not a deployed function"));
            let env: Vec<(&str, String)> =
                f.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let (path, body) = kiln_tests::runtime_api::invoke_once(
                &f.path,
                &f.function_name,
                &d["payload"],
                &env,
            )
            .expect("the function answered")
            .answer;
            out.push((d, path.ends_with("/response"), body));
        }
        out
    }
}

/// The sample events of AWS's documentation (EventBridge's "Events from AWS services", Systems
/// Manager's and EC2's event references), for this account and region.
fn aws_event(detail_type: &str, source: &str, resources: Json, detail: Json) -> Json {
    json!({
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": detail_type,
        "source": source,
        "account": ACCOUNT,
        "time": "2026-12-07T21:29:54Z",
        "region": "us-east-1",
        "resources": resources,
        "detail": detail
    })
}

fn parameter_change(name: &str, operation: &str) -> Json {
    aws_event(
        "Parameter Store Change",
        "aws.ssm",
        json!([format!(
            "arn:aws:ssm:us-east-1:{ACCOUNT}:parameter/{}",
            name.trim_start_matches('/')
        )]),
        json!({"operation": operation, "name": name, "type": "String", "description": ""}),
    )
}

fn instance_state(id: &str, state: &str) -> Json {
    aws_event(
        "EC2 Instance State-change Notification",
        "aws.ec2",
        json!([format!("arn:aws:ec2:us-east-1:{ACCOUNT}:instance/{id}")]),
        json!({"instance-id": id, "state": state}),
    )
}

fn image_state(id: &str, state: &str) -> Json {
    aws_event(
        "EC2 AMI State Change",
        "aws.ec2",
        json!([format!("arn:aws:ec2:us-east-1::image/{id}")]),
        json!({"RequestId": "7b4d4e0b-1a5c-4b0a-8b7e-3c1b1e2b0f10", "ImageId": id, "State": state, "ErrorMessage": ""}),
    )
}

fn command_status(command: &str, status: &str) -> Json {
    aws_event(
        "EC2 Command Status-change Notification",
        "aws.ssm",
        json!([format!(
            "arn:aws:ec2:us-east-1:{ACCOUNT}:instance/i-0abcd1111abcd1111"
        )]),
        json!({"command-id": command, "document-name": "AWS-RunShellScript",
               "expire-after": "2026-12-07T23:29:54.000Z",
               "parameters": {"executionTimeout": ["3600"], "commands": ["date"]},
               "requested-date-time": "2026-12-07T21:29:50.000Z", "status": status}),
    )
}

fn command_invocation_status(command: &str, status: &str) -> Json {
    aws_event(
        "EC2 Command Invocation Status-change Notification",
        "aws.ssm",
        json!([format!(
            "arn:aws:ec2:us-east-1:{ACCOUNT}:instance/i-0abcd1111abcd1111"
        )]),
        json!({"command-id": command, "document-name": "AWS-RunShellScript",
               "instance-id": "i-0abcd1111abcd1111",
               "requested-date-time": "2026-12-07T21:29:50.000Z", "status": status}),
    )
}

fn execution_status(machine: &str, status: &str) -> Json {
    let execution = format!(
        "{}:kiln-delivery-1",
        machine.replace(":stateMachine:", ":execution:")
    );
    aws_event(
        "Step Functions Execution Status Change",
        "aws.states",
        json!([execution]),
        json!({"executionArn": execution, "stateMachineArn": machine, "name": "kiln-delivery-1",
               "status": status, "startDate": 1_796_677_014_968_u64, "stopDate": null,
               "input": "{}", "inputDetails": {"included": true}, "output": null,
               "outputDetails": null, "error": null, "cause": null}),
    )
}

/// The pipeline of tests/data/aws/moto-al2023 on a parameter of the account (Parameter Store
/// sends change events for it; public `/aws/service/…` parameters send none), applied.
fn apply_on_own_parameter(r: &Rehearsal, rt: &tokio::runtime::Runtime) {
    publish_parent(r, rt, PARAM);
    let text = std::fs::read_to_string(repo().join("tests/data/aws/moto-al2023/pipeline.yaml"))
        .expect("read")
        .replace(
            "ssmParameter: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
            &format!("ssmParameter: {PARAM}"),
        );
    r.apply(&text);
}

/// The one delivery of `got` (asserting there is exactly one), to the function `logical`.
fn one_to(r: &Rehearsal, got: &[Json], logical: &str, what: &str) -> Json {
    assert_eq!(got.len(), 1, "{what}: {got:#?}");
    let d = got[0].clone();
    let f = r
        .functions
        .get(d["target"].as_str().unwrap_or_default())
        .unwrap_or_else(|| {
            panic!(
                "{what}: delivered to {}, not a deployed function",
                d["target"]
            )
        });
    assert!(
        f.function_name.contains(&format!("-{logical}-")),
        "{what}: delivered to {}",
        f.function_name
    );
    d
}

fn assert_delivered_by_events(d: &Json, what: &str) {
    assert_eq!(d["result"], "Delivered", "{what}: {d:#}");
    assert_eq!(d["principal"], "events.amazonaws.com", "{what}");
    let decision = &d["decisions"][0];
    assert_eq!(decision["action"], "lambda:InvokeFunction", "{what}: {d:#}");
    assert_eq!(decision["result"], "Allowed", "{what}: {d:#}");
    assert_eq!(
        decision["context"]["aws:SourceArn"], d["from"],
        "{what}: {d:#}"
    );
}

/// Every rule kiln makes, its event from AWS's documentation delivered through it on the default
/// bus (its function invoked with what the rule delivers), and an event it must not let through.
fn every_rule_delivers_what_it_must_and_nothing_else(r: &Rehearsal, rt: &tokio::runtime::Runtime) {
    // WHEN the parent parameter changes (Parameter Store's event)
    let changed = parameter_change(PARAM, "Update");
    let got = inject(r, &changed);
    // THEN the pipeline's rule delivers to the trigger function the transformer's input: the
    // pipeline's name and the whole event
    let d = one_to(r, &got, "TriggerFunction", "a parameter change");
    assert_delivered_by_events(&d, "trigger");
    assert!(
        d["from"]
            .as_str()
            .unwrap_or_default()
            .ends_with(":rule/kiln-al2023-moto-parent"),
        "the pipeline's rule, on the default bus: {}",
        d["from"]
    );
    assert_eq!(
        d["payload"],
        json!({"pipeline": "al2023-moto", "event": changed}),
        "the input transformer's output"
    );
    // AND the trigger function, invoked with it, starts the pipeline
    let invoked = r.deliver();
    assert_eq!(invoked.len(), 1, "{invoked:#?}");
    assert!(
        invoked[0].1,
        "the trigger function failed: {}",
        invoked[0].2
    );
    assert_eq!(invoked[0].2["started"], true, "{}", invoked[0].2);
    // AND a change of another parameter, or the parameter's deletion, delivers nothing
    for (what, e) in [
        (
            "another parameter",
            parameter_change("/images/other/latest", "Update"),
        ),
        ("the parameter deleted", parameter_change(PARAM, "Delete")),
    ] {
        assert_eq!(inject(r, &e), Vec::<Json>::new(), "{what}");
    }

    // WHEN EC2 and Systems Manager announce what ends a wait
    for (what, e) in [
        (
            "an instance running",
            instance_state("i-0abcd1111abcd1111", "running"),
        ),
        (
            "an instance terminated",
            instance_state("i-0abcd1111abcd1111", "terminated"),
        ),
        (
            "an image available",
            image_state("ami-0abcd1111abcd1111", "available"),
        ),
        (
            "an image failed",
            image_state("ami-0abcd1111abcd1111", "failed"),
        ),
        (
            "a command succeeded",
            command_status("e8d3c0e4-71f7-4491-898f-c9b35bee5f3b", "Success"),
        ),
        (
            "a command failed",
            command_status("e8d3c0e4-71f7-4491-898f-c9b35bee5f3b", "Failed"),
        ),
    ] {
        // THEN each reaches the wake function through its deployed rule, as it was sent (no
        // transformer), and the function answers it (no token awaits it: none woken)
        let got = inject(r, &e);
        let d = one_to(r, &got, "WakeFunction", what);
        assert_delivered_by_events(&d, what);
        assert_eq!(d["payload"], e, "{what}: the event as AWS sent it");
        let invoked = r.deliver();
        assert_eq!(invoked.len(), 1, "{what}: {invoked:#?}");
        assert!(
            invoked[0].1,
            "{what}: the wake function failed: {}",
            invoked[0].2
        );
        assert_eq!(invoked[0].2["woken"], 0, "{what}: {}", invoked[0].2);
    }
    // AND what does not end a wait delivers nothing
    for (what, e) in [
        (
            "an instance pending",
            instance_state("i-0abcd1111abcd1111", "pending"),
        ),
        (
            "an image pending",
            image_state("ami-0abcd1111abcd1111", "pending"),
        ),
        (
            "a command in progress",
            command_status("e8d3c0e4-71f7-4491-898f-c9b35bee5f3b", "InProgress"),
        ),
        (
            "a command invocation's status",
            command_invocation_status("e8d3c0e4-71f7-4491-898f-c9b35bee5f3b", "Success"),
        ),
    ] {
        assert_eq!(inject(r, &e), Vec::<Json>::new(), "{what}");
    }

    // WHEN an execution of this stack's state machine is stopped (Step Functions' event)
    let machine = r.outputs["StateMachineArn"].clone();
    let stopped = execution_status(&machine, "ABORTED");
    let got = inject(r, &stopped);
    // THEN the reaper's rule delivers it to the cleanup function as it was sent
    let d = one_to(r, &got, "CleanupFunction", "an execution stopped");
    assert_delivered_by_events(&d, "reaper");
    assert_eq!(d["payload"], stopped);
    // AND a running execution, or another state machine's, delivers nothing
    let other = machine.replace(
        ":stateMachine:kiln-pipeline",
        ":stateMachine:other-pipeline",
    );
    for (what, e) in [
        (
            "an execution running",
            execution_status(&machine, "RUNNING"),
        ),
        (
            "another state machine's execution",
            execution_status(&other, "ABORTED"),
        ),
    ] {
        assert_eq!(inject(r, &e), Vec::<Json>::new(), "{what}");
    }
    // (the cleanup's invocation by that event is the reaper's test's: rehearsal.rs)
    drained(r);
    let _ = rt;
}

/// PutEvents as `config`'s principal: the entries' error codes (None: put).
fn put_events(
    rt: &tokio::runtime::Runtime,
    config: &aws_config::SdkConfig,
    source: &str,
    detail_type: &str,
    detail: &Json,
    bus: &str,
) -> Vec<Option<String>> {
    let events = aws_sdk_eventbridge::Client::new(config);
    let entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
        .source(source)
        .detail_type(detail_type)
        .detail(detail.to_string())
        .event_bus_name(bus)
        .build();
    let out = rt
        .block_on(events.put_events().entries(entry).send())
        .expect("PutEvents answers");
    out.entries()
        .iter()
        .map(|e| e.error_code().map(str::to_string))
        .collect()
}

/// Nobody puts an `aws.*` event: AWS answers NotAuthorizedForSourceException for the entry,
/// whoever asks (the account's administrator, a role allowed PutEvents on the bus); the same
/// principals put a `kiln` event.
fn aws_sources_are_refused_to_every_principal(
    r: &Rehearsal,
    rt: &tokio::runtime::Runtime,
    bus: &str,
) {
    let admin = r.admin(rt);
    let cleanup = r.as_function(rt, "CleanupFunction");
    let forged = json!({"operation": "Update", "name": PARAM, "type": "String"});
    let before = deliveries(r).len();
    for (who, config) in [
        ("the administrator", &admin),
        ("the cleanup role", &cleanup),
    ] {
        // WHEN it puts Parameter Store's event itself, on the bus it may put kiln's events on
        let refused = put_events(
            rt,
            config,
            "aws.ssm",
            "Parameter Store Change",
            &forged,
            bus,
        );
        // THEN the entry is refused as AWS refuses it
        assert_eq!(
            refused,
            vec![Some("NotAuthorizedForSourceException".to_string())],
            "{who}: PutEvents of an aws.ssm event"
        );
        // AND its positive control: the same principal puts a kiln event on the stack's bus
        let put = put_events(
            rt,
            config,
            "kiln",
            "Kiln Image State Change",
            &json!({"pipeline": "al2023-moto", "state": "BUILDING"}),
            bus,
        );
        assert_eq!(put, vec![None], "{who}: PutEvents of a kiln event");
    }
    // AND nothing reached a function: the forged events matched no rule
    let after = deliveries(r);
    assert!(
        after[before..].iter().all(|d| d["kind"] != "lambda"),
        "{:#?}",
        &after[before..]
    );
    let refusals = r
        .decisions()
        .into_iter()
        .filter(|d| d["result"] == "NotAuthorizedForSourceException")
        .count();
    assert_eq!(
        refusals, 2,
        "the refusals recorded in the authorization log"
    );
}

#[test]
fn aws_events_reach_the_functions_through_the_deployed_rules_on_the_default_bus() {
    // GIVEN the stack deployed with its default bus, and a pipeline on a parameter of the account
    let r = Rehearsal::deploy();
    let rt = runtime();
    apply_on_own_parameter(&r, &rt);
    // WHEN/THEN each of kiln's rules delivers its AWS event, and only that
    every_rule_delivers_what_it_must_and_nothing_else(&r, &rt);
    // AND no principal puts AWS's events itself
    aws_sources_are_refused_to_every_principal(&r, &rt, "default");
}

/// One AWS call as the account's administrator, by boto3 (the tests link no Lambda or SNS SDK):
/// `client.operation(**arguments)`'s answer.
fn admin_call(r: &Rehearsal, client: &str, operation: &str, arguments: &Json) -> Json {
    let mut cmd = std::process::Command::new(python());
    cmd.args([
        "-c",
        "import boto3, json, sys\n\
         c = boto3.client(sys.argv[1], region_name='us-east-1')\n\
         out = getattr(c, sys.argv[2])(**json.loads(sys.argv[3]))\n\
         out.pop('ResponseMetadata', None)\n\
         print(json.dumps(out, default=str))",
        client,
        operation,
        &arguments.to_string(),
    ])
    .envs(r.moto.env());
    serde_json::from_str(&run_ok(cmd)).expect("boto3's answer as JSON")
}

/// The Lambda permission statements of a deployed function: (Sid, statement).
fn permissions(r: &Rehearsal, logical: &str) -> Vec<(String, Json)> {
    let name = r.function(logical).function_name;
    let policy = admin_call(r, "lambda", "get_policy", &json!({"FunctionName": name}));
    let policy: Json =
        serde_json::from_str(policy["Policy"].as_str().unwrap_or("{}")).expect("a policy");
    policy["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["Sid"].as_str().unwrap_or_default().to_string(), s.clone()))
        .collect()
}

#[test]
fn a_delivery_the_function_policy_does_not_allow_is_refused_by_the_evaluator_and_recorded() {
    // GIVEN the deployed stack and a pipeline on a parameter of the account
    let r = Rehearsal::deploy();
    let rt = runtime();
    apply_on_own_parameter(&r, &rt);
    let trigger = r.function("TriggerFunction").function_name;
    let changed = parameter_change(PARAM, "Update");
    // AND a rule of someone else in the account, on the default bus, naming the trigger function
    // as its target
    let events = aws_sdk_eventbridge::Client::new(&r.admin(&rt));
    rt.block_on(
        events
            .put_rule()
            .name("someone-elses-rule")
            .event_pattern(
                json!({"source": ["aws.ssm"], "detail-type": ["Parameter Store Change"]})
                    .to_string(),
            )
            .send(),
    )
    .expect("PutRule");
    let target = aws_sdk_eventbridge::types::Target::builder()
        .id("trigger")
        .arn(&r.outputs["TriggerFunctionArn"])
        .build()
        .expect("a target");
    rt.block_on(
        events
            .put_targets()
            .rule("someone-elses-rule")
            .targets(target)
            .send(),
    )
    .expect("PutTargets");
    // WHEN the parameter changes
    let got = inject(&r, &changed);
    // THEN the pipeline's rule delivers (the positive control), the other rule is refused: the
    // trigger function's permission names kiln's rules only
    assert_eq!(got.len(), 2, "{got:#?}");
    let (ours, theirs): (Vec<Json>, Vec<Json>) = got.into_iter().partition(|d| {
        d["from"]
            .as_str()
            .unwrap_or_default()
            .ends_with(":rule/kiln-al2023-moto-parent")
    });
    assert_delivered_by_events(&ours[0], "the pipeline's rule");
    assert!(
        theirs[0]["from"]
            .as_str()
            .unwrap_or_default()
            .ends_with(":rule/someone-elses-rule"),
        "{theirs:#?}"
    );
    assert_eq!(theirs[0]["result"], "Refused", "{:#}", theirs[0]);
    assert_eq!(theirs[0]["why"], "ImplicitlyDenied", "{:#}", theirs[0]);
    let invoked = r.deliver();
    assert_eq!(
        invoked.len(),
        1,
        "only the pipeline's rule's delivery runs: {invoked:#?}"
    );
    rt.block_on(
        events
            .remove_targets()
            .rule("someone-elses-rule")
            .ids("trigger")
            .send(),
    )
    .expect("RemoveTargets");

    // AND its positive control: the parameter's change is delivered to the trigger function
    let got = inject(&r, &changed);
    assert_delivered_by_events(
        &one_to(&r, &got, "TriggerFunction", "the control"),
        "control",
    );
    let _ = r.deliver();
    // WHEN the trigger function's permission for EventBridge is removed
    let (sid, statement) = permissions(&r, "TriggerFunction")
        .into_iter()
        .find(|(_, s)| s["Principal"]["Service"] == "events.amazonaws.com")
        .expect("the trigger function's permission for EventBridge");
    admin_call(
        &r,
        "lambda",
        "remove_permission",
        &json!({"FunctionName": trigger, "StatementId": sid}),
    );
    // THEN the change is refused by the evaluator, recorded, and nothing is invoked
    let got = inject(&r, &changed);
    let d = one_to(&r, &got, "TriggerFunction", "without the permission");
    assert_eq!(d["result"], "Refused", "{d:#}");
    assert_eq!(d["why"], "ImplicitlyDenied", "{d:#}");
    assert!(r.deliver().is_empty(), "a refused delivery invokes nothing");
    let line = r
        .decisions()
        .into_iter()
        .rev()
        .find(|l| l["role"] == "events.amazonaws.com")
        .expect("the refusal's line in the authorization log");
    assert_eq!(line["action"], "lambda:InvokeFunction", "{line}");
    assert_eq!(line["result"], "ImplicitlyDenied", "{line}");
    // WHEN the permission names another rule as its SourceArn
    let other = format!("arn:aws:events:us-east-1:{ACCOUNT}:rule/other-*");
    admin_call(
        &r,
        "lambda",
        "add_permission",
        &json!({"FunctionName": trigger,
        "StatementId": "other-rules", "Action": "lambda:InvokeFunction",
        "Principal": "events.amazonaws.com", "SourceArn": other, "SourceAccount": ACCOUNT}),
    );
    // THEN it is refused too
    let got = inject(&r, &changed);
    let d = one_to(&r, &got, "TriggerFunction", "another rule's permission");
    assert_eq!(d["result"], "Refused", "{d:#}");
    // AND with the deployed statement back, the same change is delivered again
    let source = statement["Condition"]["ArnLike"]["AWS:SourceArn"]
        .as_str()
        .unwrap_or_else(|| panic!("the deployed statement names its rules: {statement}"))
        .to_string();
    admin_call(
        &r,
        "lambda",
        "remove_permission",
        &json!({"FunctionName": trigger, "StatementId": "other-rules"}),
    );
    admin_call(
        &r,
        "lambda",
        "add_permission",
        &json!({"FunctionName": trigger,
        "StatementId": sid, "Action": "lambda:InvokeFunction",
        "Principal": "events.amazonaws.com", "SourceArn": source, "SourceAccount": ACCOUNT}),
    );
    let got = inject(&r, &changed);
    assert_delivered_by_events(&one_to(&r, &got, "TriggerFunction", "restored"), "restored");

    // GIVEN the wake function's image rule delivering (its control)
    let available = image_state("ami-0abcd1111abcd1111", "available");
    let got = inject(&r, &available);
    let d = one_to(&r, &got, "WakeFunction", "the wake control");
    assert_delivered_by_events(&d, "wake control");
    let rule = d["from"].as_str().unwrap_or_default().to_string();
    // WHEN the permission SAM made for that rule is removed
    let (sid, _) = permissions(&r, "WakeFunction")
        .into_iter()
        .find(|(_, s)| s["Condition"]["ArnLike"]["AWS:SourceArn"] == rule.as_str())
        .unwrap_or_else(|| panic!("the wake function's permission for {rule}"));
    admin_call(
        &r,
        "lambda",
        "remove_permission",
        &json!({
        "FunctionName": r.function("WakeFunction").function_name, "StatementId": sid}),
    );
    // THEN the image's event is refused; the instance rule's (its own permission) still passes
    let got = inject(&r, &available);
    let d = one_to(
        &r,
        &got,
        "WakeFunction",
        "without the image rule's permission",
    );
    assert_eq!(d["result"], "Refused", "{d:#}");
    assert_eq!(d["why"], "ImplicitlyDenied", "{d:#}");
    let got = inject(&r, &instance_state("i-0abcd1111abcd1111", "running"));
    assert_delivered_by_events(&one_to(&r, &got, "WakeFunction", "instance"), "instance");
}

/// A build's final state, announced on `bus` as the functions announce it, is published by
/// EventBridge to the notification topic (its policy and its key allow the stack's notification
/// rule) and mailed; a state that is not final publishes nothing. Returns the event's detail.
fn a_final_state_is_published_and_mailed(
    r: &Rehearsal,
    rt: &tokio::runtime::Runtime,
    bus: &str,
) -> Json {
    // WHEN a build's final state is announced on the stack's bus, as the functions announce it
    let admin = r.admin(rt);
    let before = deliveries(r).len();
    let detail = json!({"pipeline": "al2023-moto", "version": "1.0.0",
        "build": "01JEXAMPLE0000000000000000", "state": "AVAILABLE",
        "images": {"us-east-1": "ami-0abcd1111abcd1111"}});
    assert_eq!(
        put_events(rt, &admin, "kiln", "Kiln Image State Change", &detail, bus),
        vec![None]
    );
    // THEN EventBridge publishes it to the notification topic (its policy and its key allow the
    // notification rule), and SNS mails it
    let all = deliveries(r);
    let got: Vec<&Json> = all[before..].iter().collect();
    let published = got
        .iter()
        .find(|d| d["kind"] == "sns")
        .unwrap_or_else(|| panic!("nothing published to the topic: {got:#?}"));
    assert_eq!(published["result"], "Delivered", "{published:#}");
    assert!(
        published["from"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&if bus == "default" {
                format!(":rule/{STACK}-notify")
            } else {
                format!(":rule/{bus}/{STACK}-notify")
            }),
        "{published:#}"
    );
    let actions: Vec<&str> = published["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        actions,
        ["sns:Publish", "kms:GenerateDataKey", "kms:Decrypt"],
        "the topic's policy and its key's, as EventBridge"
    );
    let mailed = got
        .iter()
        .find(|d| d["kind"] == "email")
        .unwrap_or_else(|| panic!("nothing mailed: {got:#?}"));
    assert_eq!(mailed["target"], "builds@example.com");
    let message: Json = serde_json::from_str(mailed["payload"].as_str().unwrap_or_default())
        .expect("the event, as EventBridge publishes it");
    assert_eq!(message["detail"], detail);
    // AND a state that is not final publishes nothing
    let before = deliveries(r).len();
    let building = json!({"pipeline": "al2023-moto", "state": "BUILDING"});
    assert_eq!(
        put_events(
            rt,
            &admin,
            "kiln",
            "Kiln Image State Change",
            &building,
            bus
        ),
        vec![None]
    );
    assert!(deliveries(r)[before..].is_empty());
    detail
}

/// On the default bus (the template's default), build notifications reach the topic through the
/// stack's own notification rule, `rule/<stack>-notify`, which the key and the topic policy name.
#[test]
fn on_the_default_bus_notifications_reach_the_topic() {
    let r = Rehearsal::deploy_with(&json!({"NotificationEmail": "builds@example.com"}));
    let rt = runtime();
    assert_eq!(r.outputs["EventBusName"], "default");
    a_final_state_is_published_and_mailed(&r, &rt, "default");
    r.assert_all_allowed();
}

#[test]
fn with_a_custom_bus_parent_changes_still_trigger_and_notifications_reach_the_topic() {
    // GIVEN the stack deployed on its own bus, with build notifications by e-mail
    let bus = "kiln-bus";
    let r = Rehearsal::deploy_with(
        &json!({"EventBusName": bus, "NotificationEmail": "builds@example.com"}),
    );
    let rt = runtime();
    apply_on_own_parameter(&r, &rt);
    assert_eq!(r.outputs["EventBusName"], bus);
    // WHEN/THEN AWS's events (which reach the default bus only) still reach kiln's functions
    every_rule_delivers_what_it_must_and_nothing_else(&r, &rt);
    aws_sources_are_refused_to_every_principal(&r, &rt, bus);

    let detail = a_final_state_is_published_and_mailed(&r, &rt, bus);
    let admin = r.admin(&rt);

    // WHEN the topic is encrypted with the AWS managed key alias/aws/sns instead
    let topics = admin_call(&r, "sns", "list_topics", &json!({}));
    let topic = topics["Topics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["TopicArn"].as_str())
        .find(|a| a.contains("NotificationTopic"))
        .unwrap_or_else(|| panic!("the notification topic: {topics}"))
        .to_string();
    admin_call(
        &r,
        "sns",
        "set_topic_attributes",
        &json!({"TopicArn": topic,
        "AttributeName": "KmsMasterKeyId", "AttributeValue": "alias/aws/sns"}),
    );
    let before = deliveries(&r).len();
    assert_eq!(
        put_events(&rt, &admin, "kiln", "Kiln Image State Change", &detail, bus),
        vec![None]
    );
    // THEN EventBridge cannot publish: the key's policy refuses it, and nothing is mailed
    let all = deliveries(&r);
    let got = &all[before..];
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["kind"], "sns");
    assert_eq!(got[0]["result"], "Refused", "{:#}", got[0]);
    let refused: Vec<(&str, &str)> = got[0]["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["action"].as_str().unwrap_or_default(),
                d["result"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            ("sns:Publish", "Allowed"),
            ("kms:GenerateDataKey", "ImplicitlyDenied"),
            ("kms:Decrypt", "ImplicitlyDenied")
        ]
    );
}

/// Amazon publishing to one of its topics (as its owner): what SNS delivered.
fn inject_sns(r: &Rehearsal, topic: &str, message: &str, subject: &str) -> Vec<Json> {
    test_path(
        r,
        "POST",
        "/_kiln/inject/sns",
        &json!({"topicArn": topic, "message": message, "subject": subject}),
    )["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn an_amazon_linux_update_reaches_the_trigger_through_the_deployed_subscription() {
    // GIVEN the stack deployed following Amazon's Amazon Linux 2023 updates topic, and a pipeline
    // on the Amazon Linux public parameter
    let topic = "arn:aws:sns:us-east-1:137112412989:amazon-linux-2023-ami-updates";
    let r = Rehearsal::deploy_with(&json!({ "AmazonLinuxUpdatesTopicArn": topic }));
    r.apply(&crate::rehearsal::moto_pipeline());
    // WHEN Amazon announces new images (the topic's message: a JSON text, its subject)
    let message = json!({"v1": {"ReleaseVersion": "2023", "ImageVersion": "2023.6.20241121.0",
        "ReleaseNotes": "Updated kernel and packages.",
        "Regions": {"us-east-1": [{"ImageId": "ami-0abcd1111abcd1111",
            "Name": "al2023-ami-2023.6.20241121.0-kernel-6.1-x86_64"}]}}})
    .to_string();
    let subject = "Amazon Linux 2023 AMI: new images are available (2023.6.20241121.0)";
    let got = inject_sns(&r, topic, &message, subject);
    // THEN SNS delivers it to the trigger function, as sns.amazonaws.com for that topic, in the
    // event Lambda receives from SNS
    let d = one_to(&r, &got, "TriggerFunction", "an Amazon Linux update");
    assert_eq!(d["result"], "Delivered", "{d:#}");
    assert_eq!(d["principal"], "sns.amazonaws.com");
    assert_eq!(
        d["decisions"][0]["context"]["aws:SourceArn"], topic,
        "{d:#}"
    );
    let record = &d["payload"]["Records"][0];
    assert_eq!(record["EventSource"], "aws:sns");
    assert_eq!(record["Sns"]["TopicArn"], topic);
    assert_eq!(record["Sns"]["Message"], message.as_str());
    assert_eq!(record["Sns"]["Subject"], subject);
    // AND the trigger function, invoked with it, starts the pipeline
    let invoked = r.deliver();
    assert_eq!(invoked.len(), 1, "{invoked:#?}");
    assert!(
        invoked[0].1,
        "the trigger function failed: {}",
        invoked[0].2
    );
    assert_eq!(
        invoked[0].2["pipelines"][0]["started"], true,
        "{}",
        invoked[0].2
    );
    // WHEN the function's permission for SNS is removed
    let (sid, _) = permissions(&r, "TriggerFunction")
        .into_iter()
        .find(|(_, s)| s["Principal"]["Service"] == "sns.amazonaws.com")
        .expect("the trigger function's permission for SNS");
    admin_call(
        &r,
        "lambda",
        "remove_permission",
        &json!({"FunctionName": r.function("TriggerFunction").function_name, "StatementId": sid}),
    );
    // THEN the same update is refused by the evaluator and invokes nothing
    let got = inject_sns(&r, topic, &message, subject);
    let d = one_to(&r, &got, "TriggerFunction", "without the permission");
    assert_eq!(d["result"], "Refused", "{d:#}");
    assert_eq!(d["why"], "ImplicitlyDenied", "{d:#}");
    assert!(r.deliver().is_empty());
}
