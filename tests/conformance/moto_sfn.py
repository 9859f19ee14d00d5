"""Expected results for the ASL conformance corpus, from an interpreter we did not write.

Runs every machine of tests/data/asl/ on each of its inputs with moto's Step Functions
interpreter (ported from LocalStack), in-process, one fresh mock_aws context per execution, and
prints one JSON list: [{"file", "input", "status", "output", "error", "cause"}]. The Rust
conformance test compares kiln's engine with this.
"""
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import boto3
from moto import mock_aws


def run(definition, payload):
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        client = boto3.client("stepfunctions", region_name="us-east-1")
        try:
            arn = client.create_state_machine(
                name="conformance", definition=json.dumps(definition), roleArn="arn:aws:iam::123456789012:role/sfn"
            )["stateMachineArn"]
        except Exception as e:  # moto's parser refused a definition AWS accepts
            return {"status": "MOTO_REJECTED", "output": None, "error": None, "cause": str(e)}
        execution = client.start_execution(stateMachineArn=arn, name=str(uuid.uuid4()), input=json.dumps(payload))["executionArn"]
        deadline = time.time() + 60
        while True:
            d = client.describe_execution(executionArn=execution)
            if d["status"] != "RUNNING" or time.time() > deadline:
                break
            time.sleep(0.02)
        output = d.get("output")
        try:
            output = json.loads(output) if output else None
        except ValueError:
            pass  # moto returns a bare string result unquoted
        return {
            "status": d["status"],
            "output": output,
            "error": d.get("error"),
            "cause": d.get("cause"),
        }


def main():
    logging.disable(logging.CRITICAL)
    results = []
    for path in sorted(Path(p) for p in sys.argv[1:]):
        doc = json.loads(path.read_text())
        for index, payload in enumerate(doc["inputs"]):
            result = run(doc["definition"], payload)
            result.update({"file": path.name, "input": index})
            results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
