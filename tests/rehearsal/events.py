"""What EventBridge delivered of kiln's events, as a subscriber sees them.

`events.py subscribe BUS` makes an SQS queue and a rule on BUS matching kiln's "Kiln Image State
Change" events with the queue as its target, and prints the queue URL. `events.py drain URL`
prints the events the queue holds, in the order EventBridge delivered them, as a JSON list.
Run with the moto server's environment (AWS_ENDPOINT_URL and credentials).

`events.py match PATTERN EVENT` prints whether the rule pattern PATTERN (JSON) lets EVENT (JSON)
through, by moto's EventBridge pattern matcher — the one that routes moto's PutEvents to rules
(moto's TestEventPattern API is not implemented: it answers nothing).
"""

import json
import sys

import boto3


def subscribe(bus):
    sqs = boto3.client("sqs")
    events = boto3.client("events")
    url = sqs.create_queue(QueueName="kiln-rehearsal-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    pattern = {"source": ["kiln"], "detail-type": ["Kiln Image State Change"]}
    events.put_rule(Name="kiln-rehearsal-events", EventBusName=bus, EventPattern=json.dumps(pattern))
    events.put_targets(Rule="kiln-rehearsal-events", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
    print(url)


def drain(url):
    sqs = boto3.client("sqs")
    seen = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            break
        for m in got:
            seen.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    print(json.dumps(seen))


def match(pattern, event):
    from moto.events.models import EventPattern

    print(json.dumps(EventPattern.load(pattern).matches_event(json.loads(event))))


if __name__ == "__main__":
    if sys.argv[1] == "match":
        match(sys.argv[2], sys.argv[3])
    else:
        {"subscribe": subscribe, "drain": drain}[sys.argv[1]](sys.argv[2])
