"""What AWS's services do on the stack's behalf, in the rehearsal: EventBridge delivering to Lambda
and SNS targets, SNS delivering to Lambda, each authorized as AWS authorizes it.

moto 5.2.6 matches PutEvents to rules but cannot deliver to a Lambda or SNS target (its rule
delivery raises NotImplementedError), and SNS→Lambda needs Docker. Here, when an event enters a
bus, each enabled rule whose pattern matches it (moto's own EventPattern matcher) delivers to each
target as AWS would:

- a Lambda target: the function's resource policy (GetPolicy, as moto holds it) is evaluated by
  the rehearsal's IAM evaluator (moto_gaps.evaluator(), tests/rehearsal/authorize.cjs) for
  lambda:InvokeFunction with the principal events.amazonaws.com, aws:SourceArn the rule's ARN
  and aws:SourceAccount the rule's account; the target's Input, InputPath or InputTransformer is
  applied to the event (AWS's rules, below) and the delivery (function ARN + payload) is
  recorded. The test harness (tests/integration/delivery.rs) drains the deliveries and invokes
  the real bootstraps with them.
- an SNS target: the topic's policy for sns:Publish as events.amazonaws.com (same SourceArn and
  SourceAccount), and, for an encrypted topic, the key's policy for kms:GenerateDataKey and
  kms:Decrypt as events.amazonaws.com through SNS (the AWS managed key alias/aws/sns has AWS's
  policy: only principals of the account, through SNS, so EventBridge is refused); then SNS
  delivers to the topic's subscriptions.
- SNS to a Lambda subscription: the function's policy as sns.amazonaws.com with aws:SourceArn the
  topic's ARN; the payload is the {"Records": [{"Sns": …}]} event Lambda receives. E-mail
  subscriptions are recorded as delivered to their address.

A refused delivery is recorded with the evaluator's decision, never dropped; every decision is
also appended to the authorization log ($KILN_AUTHZ_LOG) with the service principal as its
"role", so a test asserting that nothing was denied sees a refused delivery.

PutEvents with a source starting `aws.` is refused from any principal, as AWS refuses it (the
entry fails with NotAuthorizedForSourceException): only AWS's services put those. AWS-shaped
events enter through a test-only path of this server instead, recorded as injections:

  POST /_kiln/inject/event   {"event": {AWS's event}}          → to the default bus, where AWS's
                                                                 services send their events
  POST /_kiln/inject/sns     {"topicArn", "message", "subject"} → published by the topic's owner
                                                                 (Amazon Linux's update topics)
  GET  /_kiln/deliveries     every delivery so far; ?drain=1 only those not drained before
  GET  /_kiln/injections     every injection so far

Each answers {"deliveries": [...]} (the injections: what that injection delivered). A delivery:
{"seq", "via": "events"|"sns", "from": rule or topic ARN, "principal", "target": ARN or address,
"kind": "lambda"|"sns"|"email"|"sqs", "result": "Delivered"|"Refused"|"Failed", "why",
"payload" (Lambda: the JSON it is invoked with; SNS: the message text), "decisions"}.

Input transformers, as EventBridge applies them (its user guide, "Amazon EventBridge input
transformation"): InputPathsMap values are JSON paths in dot notation with array indices
(`$.detail.name`, `$.resources[0]`); a path the event lacks creates no variable, and its
placeholder stays as written. The predefined variables are aws.events.rule-arn,
aws.events.rule-name, aws.events.event.ingestion-time, aws.events.event (the event without
`detail`) and aws.events.event.json (the whole event). In a JSON template a placeholder outside a
string is replaced by the value as JSON (a string quoted); inside a string, or in a string
template, a string value is inserted as it is, unescaped (EventBridge does not escape extracted
values), anything else as JSON. A Lambda target's payload must then be JSON, else the delivery
fails.
"""

import copy
import datetime
import json
import os
import re
import threading
import urllib.parse
import uuid

import moto_gaps
from moto.awslambda.models import lambda_backends
from moto.events.models import EventsBackend, Rule, events_backends
from moto.kms.models import kms_backends
from moto.sns.models import Subscription, sns_backends

PARTITION = "aws"
INJECT_PREFIX = "/_kiln/"

LOCK = threading.RLock()
INJECTIONS = []
DELIVERIES = []
DRAINED = [0]


def log(entry):
    path = os.environ.get("KILN_AUTHZ_LOG")
    if not path:
        return
    with LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def keep(delivery):
    with LOCK:
        delivery["seq"] = len(DELIVERIES)
        DELIVERIES.append(delivery)
    return delivery


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- who may ---------------------------------------------------------------------------------------


def decide(principal, action, resource, account, context, policy, why_for):
    """The evaluator's decision for a service principal's request, logged as the service's."""
    question = {
        "principal": principal,
        "action": action,
        "resource": resource,
        "accountId": account,
        "context": {"aws:SecureTransport": "true", **context},
        "identityPolicies": [],
        "resourcePolicy": policy,
    }
    evaluator = moto_gaps.evaluator()
    if evaluator is None:
        decision = {"result": "Error", "why": "no IAM evaluator (KILN_AUTHZ_MODULES unset)"}
    else:
        decision = evaluator.decide(question)
    entry = {
        "role": principal,
        "service": action.split(":", 1)[0],
        "operation": f"delivery {why_for}",
        "action": action,
        "resource": resource,
        "context": context,
        "result": decision["result"],
        "delivery": True,
    }
    if decision.get("why"):
        entry["why"] = decision["why"]
    log(entry)
    return entry


def function_policy(function_arn):
    """The function's resource policy as Lambda's GetPolicy answers it, or None (none: Lambda
    then lets no service invoke it)."""
    parts = function_arn.split(":")
    account, region, name = parts[4], parts[3], parts[6]
    try:
        wire = json.loads(lambda_backends[account][region].get_policy(name))
    except Exception:  # moto: GenericResourcNotFound when the function has no statement
        return None
    policy = wire.get("Policy")
    policy = json.loads(policy) if isinstance(policy, str) else policy
    # moto keeps a permission's request fields (FunctionName, …) in the statements CloudFormation
    # made; Lambda's GetPolicy answers the policy language's keys only.
    policy["Statement"] = [
        {k: v for k, v in statement.items() if k in STATEMENT_KEYS} for statement in policy.get("Statement", [])
    ]
    return policy


STATEMENT_KEYS = ("Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource", "Condition")


def function_exists(function_arn):
    parts = function_arn.split(":")
    try:
        lambda_backends[parts[4]][parts[3]].get_function(parts[6])
        return True
    except Exception:
        return False


# The AWS managed key of SNS (alias/aws/sns): its key policy as AWS writes it. Only principals of
# the account, calling through SNS, may use it; a service principal such as
# events.amazonaws.com has no caller account, so EventBridge cannot publish to a topic it
# encrypts (AWS's EventBridge and SNS documentation: use a customer managed key).
def aws_managed_sns_key_policy(account, region):
    return {
        "Version": "2012-10-17",
        "Id": "auto-sns",
        "Statement": [
            {
                "Sid": "Allow access through SNS for all principals in the account that are authorized to use SNS",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": ["kms:Decrypt", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:ListGrants", "kms:DescribeKey"],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {
                        "kms:ViaService": f"sns.{region}.amazonaws.com",
                        "kms:CallerAccount": account,
                    }
                },
            },
            {
                "Sid": "Allow direct access to key metadata to the account",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{PARTITION}:iam::{account}:root"},
                "Action": ["kms:Describe*", "kms:Get*", "kms:List*", "kms:RevokeGrant"],
                "Resource": "*",
            },
        ],
    }


def topic_key(topic, account, region):
    """(key ARN, key policy) of an encrypted topic's key; None when the topic is not encrypted."""
    key = topic.kms_master_key_id
    if not key:
        return None
    name = key.split(":alias/", 1)[1] if ":alias/" in key else key[len("alias/"):] if key.startswith("alias/") else None
    if name == "aws/sns":
        # The key behind the alias, named as moto_server.key_arn names an alias's key.
        return (f"arn:{PARTITION}:kms:{region}:{account}:key/alias-aws-sns", aws_managed_sns_key_policy(account, region))
    kms = kms_backends[account][region]
    try:
        key_id = kms.get_key_id_from_alias(f"alias/{name}") if name else key
        k = kms.describe_key(key_id)
    except Exception:
        return (key, None)
    return (k.arn, json.loads(k.policy) if isinstance(k.policy, str) else k.policy)


# --- the input a target gets -----------------------------------------------------------------------

PATH_TOKEN = re.compile(r"\.([A-Za-z0-9_\-/]+)|\[(\d+)\]")


def select(event, path):
    """(found, value) of an EventBridge JSON path: `$`, dot notation, array indices."""
    if not path.startswith("$"):
        return False, None
    rest, value = path[1:], event
    while rest:
        m = PATH_TOKEN.match(rest)
        if not m:
            return False, None
        if m.group(1) is not None:
            if not isinstance(value, dict) or m.group(1) not in value:
                return False, None
            value = value[m.group(1)]
        else:
            i = int(m.group(2))
            if not isinstance(value, list) or i >= len(value):
                return False, None
            value = value[i]
        rest = rest[m.end():]
    return True, value


def transformed(transformer, event, rule_arn, rule_name):
    values = {}
    for name, path in (transformer.get("InputPathsMap") or {}).items():
        found, value = select(event, path)
        if found:
            values[name] = value
    values["aws.events.rule-arn"] = rule_arn
    values["aws.events.rule-name"] = rule_name
    values["aws.events.event.ingestion-time"] = now_iso()
    values["aws.events.event"] = {k: v for k, v in event.items() if k != "detail"}
    values["aws.events.event.json"] = event
    template = transformer.get("InputTemplate", "")
    json_template = template.lstrip().startswith(("{", "["))
    out, in_string, i = [], False, 0
    while i < len(template):
        c = template[i]
        if json_template and c == "\\" and in_string:
            out.append(template[i:i + 2])
            i += 2
            continue
        if json_template and c == '"':
            in_string = not in_string
        if c == "<":
            end = template.find(">", i)
            name = template[i + 1:end] if end > 0 else ""
            if name in values:
                value = values[name]
                if isinstance(value, str) and (in_string or not json_template):
                    out.append(value)
                else:
                    out.append(json.dumps(value, separators=(",", ":")))
                i = end + 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def target_input(target, event, rule_arn, rule_name):
    """The text a target receives for `event`, as EventBridge makes it."""
    if target.get("Input") is not None:
        return target["Input"]
    if target.get("InputPath"):
        found, value = select(event, target["InputPath"])
        return json.dumps(value if found else None)
    if target.get("InputTransformer"):
        return transformed(target["InputTransformer"], event, rule_arn, rule_name)
    return json.dumps(event)


# --- delivering ------------------------------------------------------------------------------------


def lambda_delivery(via, source_arn, source_account, principal, function_arn, text):
    """Lambda invoked by `principal` on behalf of `source_arn`, recorded (and returned)."""
    base = {"via": via, "from": source_arn, "principal": principal, "target": function_arn, "kind": "lambda"}
    try:
        payload = json.loads(text)
    except ValueError as e:
        return keep({**base, "result": "Failed", "why": f"the input is not JSON ({e})", "payload": text})
    if not function_exists(function_arn):
        return keep({**base, "result": "Failed", "why": "ResourceNotFoundException: no such function", "payload": payload})
    account = function_arn.split(":")[4]
    decision = decide(
        principal,
        "lambda:InvokeFunction",
        function_arn,
        account,
        {"aws:SourceArn": source_arn, "aws:SourceAccount": source_account},
        function_policy(function_arn),
        f"{source_arn} → {function_arn}",
    )
    result = "Delivered" if decision["result"] == "Allowed" else "Refused"
    return keep({**base, "result": result, "why": decision["result"], "payload": payload, "decisions": [decision]})


def find_topic(topic_arn):
    parts = topic_arn.split(":")
    try:
        return sns_backends[parts[4]][parts[3]].topics.get(topic_arn)
    except KeyError:
        return None


def subscriptions_of(topic_arn):
    """Every subscription to the topic, in whichever account made it (a stack subscribes to
    Amazon's topics from its own account)."""
    region = topic_arn.split(":")[3]
    out = []
    for account in list(sns_backends.keys()):
        try:
            backend = sns_backends[account][region]
        except KeyError:
            continue
        out += [s for s in list(backend.subscriptions.values()) if s.topic.arn == topic_arn]
    return out


def sns_record(subscription, topic_arn, message_id, message, subject):
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": subscription.arn,
                "Sns": {
                    "Type": "Notification",
                    "MessageId": message_id,
                    "TopicArn": topic_arn,
                    "Subject": subject,
                    "Message": message,
                    "Timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                    "SignatureVersion": "1",
                    "Signature": "kiln-rehearsal",
                    "SigningCertUrl": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-kiln.pem",
                    "UnsubscribeUrl": f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={subscription.arn}",
                    "MessageAttributes": {},
                },
            }
        ]
    }


def fan_out(topic_arn, message, subject=None):
    """SNS delivering a published message to the topic's subscriptions."""
    message_id = str(uuid.uuid4())
    topic_account = topic_arn.split(":")[4]
    out = []
    for s in subscriptions_of(topic_arn):
        if s.protocol == "lambda":
            payload = json.dumps(sns_record(s, topic_arn, message_id, message, subject))
            out.append(lambda_delivery("sns", topic_arn, topic_account, "sns.amazonaws.com", s.endpoint, payload))
        elif s.protocol in ("email", "email-json"):
            out.append(keep({"via": "sns", "from": topic_arn, "principal": "sns.amazonaws.com", "target": s.endpoint,
                             "kind": "email", "result": "Delivered", "why": "", "payload": message}))
        else:
            ORIGINAL_SUBSCRIPTION_PUBLISH(s, message, message_id, subject=subject)
            out.append(keep({"via": "sns", "from": topic_arn, "principal": "sns.amazonaws.com", "target": s.endpoint,
                             "kind": s.protocol, "result": "Delivered", "why": "by moto", "payload": message}))
    return out


def sns_delivery(rule_arn, rule_account, topic_arn, message):
    """EventBridge publishing to an SNS topic: the topic's policy and key, then SNS's delivery."""
    base = {"via": "events", "from": rule_arn, "principal": "events.amazonaws.com", "target": topic_arn, "kind": "sns"}
    topic = find_topic(topic_arn)
    if topic is None:
        return [keep({**base, "result": "Failed", "why": "NotFound: no such topic", "payload": message})]
    account, region = topic_arn.split(":")[4], topic_arn.split(":")[3]
    context = {"aws:SourceArn": rule_arn, "aws:SourceAccount": rule_account}
    decisions = [decide("events.amazonaws.com", "sns:Publish", topic_arn, account, context,
                        topic._policy_json, f"{rule_arn} → {topic_arn}")]
    key = topic_key(topic, account, region)
    if key is not None:
        key_arn, policy = key
        for action in ("kms:GenerateDataKey", "kms:Decrypt"):
            decisions.append(decide("events.amazonaws.com", action, key_arn, account,
                                    {**context, "kms:ViaService": f"sns.{region}.amazonaws.com"},
                                    policy, f"{rule_arn} → {topic_arn} ({key_arn})"))
    refused = [d for d in decisions if d["result"] != "Allowed"]
    if refused:
        why = "; ".join(f"{d['action']} on {d['resource']}: {d['result']}" for d in refused)
        return [keep({**base, "result": "Refused", "why": why, "payload": message, "decisions": decisions})]
    out = [keep({**base, "result": "Delivered", "why": "", "payload": message, "decisions": decisions})]
    return out + fan_out(topic_arn, message)


def aws_shaped(event):
    """The event as AWS delivers it (moto keeps `time` as a number and adds `ingestion-time`)."""
    e = {k: v for k, v in event.items() if k != "ingestion-time"}
    if isinstance(e.get("time"), (int, float)):
        e["time"] = datetime.datetime.fromtimestamp(e["time"], datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return e


def moto_shaped(event):
    e = dict(event)
    if isinstance(e.get("time"), str):
        try:
            e["time"] = datetime.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            pass
    return e


def served_by_us(target):
    service = target["Arn"].split(":")[2] if target["Arn"].count(":") >= 5 else ""
    return service in ("lambda", "sns")


ORIGINAL_SEND = Rule.send_to_targets


def send_to_targets(self, original_event, transform_input=True):
    """A rule delivering an event that entered its bus: Lambda and SNS targets here, the others
    (SQS, logs, …) by moto."""
    ours = [t for t in self.targets if served_by_us(t)]
    others = [t for t in self.targets if not served_by_us(t)]
    if others:
        rule = copy.copy(self)
        rule.targets = others
        ORIGINAL_SEND(rule, moto_shaped(original_event), transform_input)
    if not ours or self.state != "ENABLED":
        return
    event = aws_shaped(original_event)
    if not self.event_pattern.matches_event(event):
        return
    for target in ours:
        text = target_input(target, event, self.arn, self.name)
        if target["Arn"].split(":")[2] == "lambda":
            lambda_delivery("events", self.arn, self.account_id, "events.amazonaws.com", target["Arn"], text)
        else:
            sns_delivery(self.arn, self.account_id, target["Arn"], text)


ORIGINAL_PUT_EVENTS = EventsBackend.put_events

AWS_SOURCE_REFUSED = {
    "ErrorCode": "NotAuthorizedForSourceException",
    "ErrorMessage": "You do not have permissions to publish events with this source onto this event bus.",
}


def put_events(self, events):
    """PutEvents: an entry whose source is AWS's (`aws.…`) fails as AWS fails it, whoever sends
    it; only AWS's services put those events (here: the test-only injection)."""
    if len(events) > 10:
        return ORIGINAL_PUT_EVENTS(self, events)
    out = []
    for e in events:
        if str(e.get("Source", "")).startswith("aws."):
            log({"service": "events", "operation": "PutEvents", "source": e.get("Source"),
                 "result": AWS_SOURCE_REFUSED["ErrorCode"], "why": "only AWS services put aws.* events"})
            out.append(dict(AWS_SOURCE_REFUSED))
        else:
            out += ORIGINAL_PUT_EVENTS(self, [e])
    return out


ORIGINAL_SUBSCRIPTION_PUBLISH = Subscription.publish


def subscription_publish(self, message, message_id, subject=None, **kwargs):
    """A message published through moto's SNS API: Lambda and e-mail subscriptions delivered
    here (moto invokes Lambda in Docker), others by moto."""
    topic_arn = self.topic.arn
    if self.protocol == "lambda":
        payload = json.dumps(sns_record(self, topic_arn, message_id, message, subject))
        lambda_delivery("sns", topic_arn, topic_arn.split(":")[4], "sns.amazonaws.com", self.endpoint, payload)
        return None
    if self.protocol in ("email", "email-json"):
        keep({"via": "sns", "from": topic_arn, "principal": "sns.amazonaws.com", "target": self.endpoint,
              "kind": "email", "result": "Delivered", "why": "", "payload": message})
        return None
    return ORIGINAL_SUBSCRIPTION_PUBLISH(self, message, message_id, subject=subject, **kwargs)


def install():
    Rule.send_to_targets = send_to_targets
    EventsBackend.put_events = put_events
    Subscription.publish = subscription_publish


# --- the test-only way in --------------------------------------------------------------------------


def inject_event(event):
    """An AWS service's event entering the default bus of its account and region (AWS's
    services send theirs to the default bus only)."""
    account, region = event.get("account", ""), event.get("region", "")
    backend = events_backends[account][region]
    bus = backend.event_buses.get("default")
    INJECTIONS.append({"via": "events", "event": event})
    if bus is None:
        return
    for rule in list(bus.rules.values()):
        rule.send_to_targets(moto_shaped(event))


def inject_sns(topic_arn, message, subject):
    INJECTIONS.append({"via": "sns", "topicArn": topic_arn, "message": message, "subject": subject})
    fan_out(topic_arn, message, subject)


def answer(start_response, status, document):
    data = json.dumps(document).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def handle(environ, start_response, body):
    """The test-only requests (INJECT_PREFIX): injections and the deliveries made."""
    path = environ.get("PATH_INFO", "")
    method = environ.get("REQUEST_METHOD", "GET")
    with LOCK:
        start = len(DELIVERIES)
        if method == "POST" and path == "/_kiln/inject/event":
            inject_event(json.loads(body)["event"])
        elif method == "POST" and path == "/_kiln/inject/sns":
            q = json.loads(body)
            inject_sns(q["topicArn"], q["message"], q.get("subject"))
        elif method == "GET" and path == "/_kiln/injections":
            return answer(start_response, "200 OK", {"injections": INJECTIONS})
        elif method == "GET" and path == "/_kiln/deliveries":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            if query.get("drain") == ["1"]:
                first, DRAINED[0] = DRAINED[0], len(DELIVERIES)
                return answer(start_response, "200 OK", {"deliveries": DELIVERIES[first:]})
            return answer(start_response, "200 OK", {"deliveries": DELIVERIES})
        else:
            return answer(start_response, "404 Not Found", {"error": f"no test path {method} {path}"})
        return answer(start_response, "200 OK", {"deliveries": DELIVERIES[start:]})
