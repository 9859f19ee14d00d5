#!/usr/bin/env python3
"""The template CloudFormation runs: infra/template.yaml expanded by aws-sam-translator.

CloudFormation applies the `AWS::Serverless-2016-10-31` transform with aws-sam-translator (the
library this script calls); what comes out is the template whose resources, dependencies and
policies AWS really creates. `sam deploy` first uploads the local artifacts; this script does the
same substitutions without uploading:

- `DefinitionUri: statemachine/pipeline.asl.json` is inlined as `Definition` (what `sam` does
  for a local file when it packages inline), so the expanded state machine carries the definition
  with its `DefinitionSubstitutions`;
- each function's `CodeUri` becomes `s3://BUCKET/PREFIX<binary>.zip` (`--code-bucket`,
  `--code-prefix`): the zip of `target/lambda/<binary>/bootstrap` that a deployment uploads.

Usage: expand.py TEMPLATE [-o OUT.json] [--region R] [--account A] [--parameter K=V ...]
                 [--code-bucket B] [--code-prefix P]
"""

import argparse
import json
import os
import sys

import yaml
from samtranslator.translator.transform import transform
from samtranslator.model.exceptions import InvalidDocumentException


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (`!Ref X` → `{"Ref": "X"}`)."""


def _intrinsic(loader, tag_suffix, node):
    name = {"Ref": "Ref", "Condition": "Condition"}.get(tag_suffix, "Fn::" + tag_suffix)
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


class StaticManagedPolicies:
    """The AWS managed policies the template names, by name → ARN.

    The translator asks IAM for this map only when a SAM `Policies` entry is a bare managed
    policy name; the stack names none today, so an unknown name is an error here rather than a
    network call."""

    def load(self):
        return {}


def expand(template_path, region, account, parameters, code_bucket, code_prefix):
    with open(template_path, encoding="utf-8") as f:
        template = yaml.load(f, Loader=CfnLoader)
    base = os.path.dirname(os.path.abspath(template_path))
    for name, resource in template.get("Resources", {}).items():
        props = resource.setdefault("Properties", {})
        if resource.get("Type") == "AWS::Serverless::StateMachine" and isinstance(
            props.get("DefinitionUri"), str
        ):
            with open(os.path.join(base, props.pop("DefinitionUri")), encoding="utf-8") as d:
                props["Definition"] = json.load(d)
        if resource.get("Type") == "AWS::Serverless::Function" and isinstance(
            props.get("CodeUri"), str
        ):
            binary = resource.get("Metadata", {}).get("BuildProperties", {}).get("Binary", name)
            props["CodeUri"] = {"Bucket": code_bucket, "Key": f"{code_prefix}{binary}.zip"}
    values = {
        k: v.get("Default")
        for k, v in template.get("Parameters", {}).items()
        if "Default" in v
    }
    values.update(parameters)
    values.update(
        {"AWS::Region": region, "AWS::AccountId": account, "AWS::Partition": "aws"}
    )
    # The translator reads the region from a boto3 session as well as from the values.
    os.environ["AWS_DEFAULT_REGION"] = region
    return transform(template, values, StaticManagedPolicies())


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("template")
    p.add_argument("-o", "--output")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account", default="123456789012")
    p.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--code-bucket", default="kiln-code")
    p.add_argument("--code-prefix", default="functions/")
    a = p.parse_args(argv)
    params = dict(kv.split("=", 1) for kv in a.parameter)
    try:
        out = expand(a.template, a.region, a.account, params, a.code_bucket, a.code_prefix)
    except InvalidDocumentException as e:
        for cause in e.causes:
            print(f"{a.template}: {cause.message}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2, sort_keys=False)
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
