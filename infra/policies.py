#!/usr/bin/env python3
"""Every IAM policy document of an expanded template, for policy linters (parliament).

Intrinsics are resolved to representative strings (`${AWS::Region}` → us-east-1, `!GetAtt X.Arn`
→ an ARN of X's type), which keeps each ARN's shape, the part linters check. Writes one JSON file
per role and policy into OUT_DIR: `<Role>.<Policy>.json`.

Usage: policies.py EXPANDED.json OUT_DIR
"""

import json
import os
import sys

import intrinsics

PSEUDO = {"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::Partition": "aws",
          "AWS::StackName": "kiln", "AWS::URLSuffix": "amazonaws.com"}
ARN_OF = {
    "AWS::S3::Bucket": "arn:aws:s3:::{}",
    "AWS::IAM::Role": "arn:aws:iam::123456789012:role/{}",
    "AWS::DynamoDB::Table": "arn:aws:dynamodb:us-east-1:123456789012:table/{}",
    "AWS::Lambda::Function": "arn:aws:lambda:us-east-1:123456789012:function:{}",
    "AWS::SQS::Queue": "arn:aws:sqs:us-east-1:123456789012:{}",
    "AWS::Logs::LogGroup": "arn:aws:logs:us-east-1:123456789012:log-group:{}",
    "AWS::StepFunctions::StateMachine": "arn:aws:states:us-east-1:123456789012:stateMachine:{}",
}


def resolve(value, template):
    resources = template.get("Resources", {})
    params = {k: v.get("Default", k) for k, v in template.get("Parameters", {}).items()}

    def ref(name):
        if name in PSEUDO:
            return PSEUDO[name]
        if name in params:
            return str(params[name])
        kind = resources.get(name, {}).get("Type", "")
        if kind in ("AWS::Lambda::Function", "AWS::StepFunctions::StateMachine", "AWS::SNS::Topic"):
            return ARN_OF.get(kind, "{}").format(name)
        return name.lower()

    def getatt(name, attr):
        kind = resources.get(name, {}).get("Type", "")
        return ARN_OF.get(kind, "arn:aws:unknown:::{}").format(name.lower())

    return intrinsics.resolve(value, ref, getatt)


def main(path, out):
    template = json.load(open(path, encoding="utf-8"))
    os.makedirs(out, exist_ok=True)
    n = 0
    for name, r in template.get("Resources", {}).items():
        if r.get("Type") != "AWS::IAM::Role":
            continue
        for p in r.get("Properties", {}).get("Policies", []):
            doc = resolve(p["PolicyDocument"], template)
            pname = resolve(p["PolicyName"], template)
            with open(os.path.join(out, f"{name}.{pname}.json"), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            n += 1
    print(f"{n} policies written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
