"""Deploys the expanded template into moto's CloudFormation, as `sam deploy` would into AWS.

1. Each function's code: target/<profile>/<binary> zipped as `bootstrap`, uploaded to a code
   bucket in moto's S3 (the expanded template's CodeUri points there).
2. create_stack with the expanded template; the stack must reach CREATE_COMPLETE.
3. What moto's CloudFormation cannot create, made through its own API from the template's values:
   the artifacts bucket policy (AWS::S3::BucketPolicy), the cleanup function's daily schedule
   (AWS::Scheduler::Schedule, from SAM's ScheduleV2 event), the notification topic's policy
   (AWS::SNS::TopicPolicy) and the trigger's subscription to the Amazon Linux updates topic
   (AWS::SNS::Subscription; the topic, Amazon's, is made in its own account first). Any other
   resource whose Condition holds and that is not in the stack fails the deploy: none is excused.
4. For each function: its deployed configuration (environment, role) read back from Lambda, and
   credentials of its own role (sts:AssumeRole), which the test hands to the function's bootstrap.
5. Credentials of the roles AWS services act as for the stack (`serviceRoles`, by role ARN): the
   state machine's role, which the test's engine signs each Task's invocation with, and the roles
   of the schedules (the scheduler role kiln's schedules name, the daily lifecycle's), which the
   test signs a schedule's StartExecution with.

Prints one JSON document: stack outputs, the deployed definition, and the functions by ARN.
Usage: deploy.py EXPANDED.json BIN_DIR STACK   (AWS_ENDPOINT_URL and credentials from the env)
"""

import hashlib
import io
import json
import os
import platform
import sys
import zipfile

import boto3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "infra"))
import intrinsics  # noqa: E402  (infra/intrinsics.py, shared with infra/policies.py)

CODE_BUCKET = "kiln-code"


def client(name):
    return boto3.client(name, region_name="us-east-1")


def resolve(value, physical, stack):
    """Ref / Fn::GetAtt …Arn / Fn::Sub of this stack's resources, with their physical ids."""
    pseudo = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
              "AWS::Partition": "aws", "AWS::StackName": stack}

    def arn(name):
        kind, pid = physical[name]
        if kind == "AWS::S3::Bucket":
            return f"arn:aws:s3:::{pid}"
        if kind == "AWS::Lambda::Function":  # moto's physical id is the function's name
            return f"arn:aws:lambda:us-east-1:123456789012:function:{pid}"
        if kind == "AWS::Events::Rule":  # moto's physical id is the rule's name
            bus = PARAMETERS.get("EventBusName", "default")
            return f"arn:aws:events:us-east-1:123456789012:rule/{'' if bus == 'default' else bus + '/'}{pid}"
        return pid

    def ref(name):
        return pseudo.get(name) or PARAMETERS.get(name) or physical[name][1]

    return intrinsics.resolve(value, ref, lambda name, _attr: arn(name))


# Parameters beside Architecture and AgentSha256: $KILN_DEPLOY_PARAMETERS, a JSON object
# (e.g. {"EventBusName": "kiln-bus", "NotificationEmail": "ops@example.com"}).
PARAMETERS = json.loads(os.environ.get("KILN_DEPLOY_PARAMETERS") or "{}")


def condition_holds(resource, template, stack="kiln"):
    """Whether a resource's Condition holds for PARAMETERS (their defaults otherwise), evaluated
    as CloudFormation evaluates Conditions (Fn::Equals, Fn::Not, Fn::And, Fn::Or, Condition, Ref
    of a parameter or pseudo parameter). A form it does not know is an error, never False: a
    resource must not be excused because its condition was not understood."""
    conditions = template.get("Conditions", {})
    pseudo = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012",
              "AWS::Partition": "aws", "AWS::StackName": stack}

    def value(v):
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and list(v) == ["Ref"]:
            name = v["Ref"]
            if name in pseudo:
                return pseudo[name]
            return PARAMETERS.get(name, template["Parameters"][name].get("Default", ""))
        raise ValueError(f"deploy.py cannot evaluate the condition value {v!r}")

    def holds(expr):
        if isinstance(expr, dict) and len(expr) == 1:
            (fn, args), = expr.items()
            if fn == "Fn::Equals":
                return value(args[0]) == value(args[1])
            if fn == "Fn::Not":
                return not holds(args[0])
            if fn == "Fn::And":
                return all(holds(a) for a in args)
            if fn == "Fn::Or":
                return any(holds(a) for a in args)
            if fn == "Condition":
                return holds(conditions[args])
        raise ValueError(f"deploy.py cannot evaluate the condition {expr!r}")

    name = resource.get("Condition")
    return True if name is None else holds(conditions[name])


def main(expanded_path, bin_dir, stack):
    template = json.load(open(expanded_path, encoding="utf-8"))
    s3 = client("s3")
    s3.create_bucket(Bucket=CODE_BUCKET)
    binaries = {}
    for name, r in template["Resources"].items():
        if r["Type"] == "AWS::Lambda::Function":
            key = r["Properties"]["Code"]["S3Key"]
            binary = key.rsplit("/", 1)[-1][: -len(".zip")]
            binaries[name] = binary
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
                info = zipfile.ZipInfo("bootstrap")
                info.external_attr = 0o755 << 16
                with open(f"{bin_dir}/{binary}", "rb") as f:
                    z.writestr(info, f.read())
            s3.put_object(Bucket=CODE_BUCKET, Key=key, Body=buf.getvalue())

    with open(f"{bin_dir}/kiln-agent", "rb") as f:
        agent = f.read()
    agent_sha256 = hashlib.sha256(agent).hexdigest()
    cfn = client("cloudformation")
    if PARAMETERS.get("EventBusName", "default") != "default":
        # The stack names a bus its administrator made (the template makes none).
        client("events").create_event_bus(Name=PARAMETERS["EventBusName"])
    cfn.create_stack(
        StackName=stack,
        TemplateBody=json.dumps(template),
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
        Parameters=[
            {"ParameterKey": "Architecture", "ParameterValue": "x86_64"},
            # As `make deploy` pins it: the agent this checkout built.
            {"ParameterKey": "AgentSha256", "ParameterValue": f"{platform.machine()}={agent_sha256}"},
        ] + [{"ParameterKey": k, "ParameterValue": v} for k, v in PARAMETERS.items()],
    )
    described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
    if described["StackStatus"] != "CREATE_COMPLETE":
        print(f"stack {stack}: {described['StackStatus']} {described.get('StackStatusReason')}", file=sys.stderr)
        return 1
    physical = {
        r["LogicalResourceId"]: (r["ResourceType"], r.get("PhysicalResourceId", ""))
        for r in cfn.list_stack_resources(StackName=stack)["StackResourceSummaries"]
    }
    made_by_api = []
    schedule_roles = []
    for name, r in template["Resources"].items():
        if r["Type"] == "AWS::S3::BucketPolicy":
            props = resolve(r["Properties"], physical, stack)
            s3.put_bucket_policy(Bucket=props["Bucket"], Policy=json.dumps(props["PolicyDocument"]))
            made_by_api.append(name)
        elif r["Type"] == "AWS::SNS::TopicPolicy" and name not in physical and condition_holds(r, template, stack):
            props = resolve(r["Properties"], physical, stack)
            for topic in props["Topics"]:
                client("sns").set_topic_attributes(
                    TopicArn=topic, AttributeName="Policy", AttributeValue=json.dumps(props["PolicyDocument"]))
            made_by_api.append(name)
        elif r["Type"] == "AWS::SNS::Subscription" and name not in physical and condition_holds(r, template, stack):
            # A subscription to a topic of another account (Amazon's Amazon Linux updates topic):
            # the topic exists there in AWS; here it is made in that account first, as its owner
            # would have, then the stack's subscription to it.
            props = resolve(r["Properties"], physical, stack)
            owner, region = props["TopicArn"].split(":")[4], props["TopicArn"].split(":")[3]
            sns = boto3.client("sns", region_name=region)
            sns.meta.events.register("before-sign.sns.*", lambda request, **_: request.headers.__setitem__("x-moto-account-id", owner))
            sns.create_topic(Name=props["TopicArn"].rsplit(":", 1)[-1])
            sns.subscribe(TopicArn=props["TopicArn"], Protocol=props["Protocol"], Endpoint=props["Endpoint"])
            made_by_api.append(name)
        elif r["Type"] == "AWS::Scheduler::Schedule":
            props = resolve(r["Properties"], physical, stack)
            target = props["Target"]
            schedule_roles.append(target["RoleArn"])
            client("scheduler").create_schedule(
                Name=props.get("Name") or f"{stack}-{name}",
                ScheduleExpression=props["ScheduleExpression"],
                FlexibleTimeWindow=props.get("FlexibleTimeWindow", {"Mode": "OFF"}),
                Target={k: v for k, v in target.items() if k in ("Arn", "RoleArn", "Input")},
                State=props.get("State", "ENABLED"),
            )
            made_by_api.append(name)
        elif name not in physical and condition_holds(r, template, stack):
            # Made by nobody: a resource the template makes here (its condition holds) that is
            # neither in the stack nor made above fails the deploy; none is excused.
            print(f"moto's CloudFormation did not create {name} ({r['Type']})", file=sys.stderr)
            return 1

    lam, sts = client("lambda"), client("sts")
    functions = {}
    for name, binary in binaries.items():
        cfg = lam.get_function_configuration(FunctionName=physical[name][1])
        creds = sts.assume_role(RoleArn=cfg["Role"], RoleSessionName=binary)["Credentials"]
        functions[cfg["FunctionArn"]] = {
            "logicalId": name,
            "functionName": cfg["FunctionName"],
            "binary": binary,
            "role": cfg["Role"],
            "environment": cfg.get("Environment", {}).get("Variables", {}),
            "credentials": {
                "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
                "AWS_SESSION_TOKEN": creds["SessionToken"],
            },
        }
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    # Then the agent, as `make deploy` uploads it after the stack.
    s3.put_object(
        Bucket=outputs["ArtifactsBucketName"],
        Key=f"agent/kiln-agent-{platform.machine()}",
        Body=agent,
        Metadata={"sha256": agent_sha256},
    )
    machine = client("stepfunctions").describe_state_machine(stateMachineArn=outputs["StateMachineArn"])
    definition = machine["definition"]
    service_roles = {}
    for role in [machine["roleArn"], outputs["SchedulerRoleArn"], *schedule_roles]:
        creds = sts.assume_role(RoleArn=role, RoleSessionName="service")["Credentials"]
        service_roles[role] = {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
        }
    json.dump(
        {"outputs": outputs, "definition": definition, "functions": functions, "madeByApi": made_by_api,
         "stateMachineRole": machine["roleArn"], "serviceRoles": service_roles},
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
