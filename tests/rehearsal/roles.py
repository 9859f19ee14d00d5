"""Roles for the rehearsal's signature and grant tests, made and changed by the administrator.

`roles.py assume NAME POLICY_JSON` creates the role NAME (trusted by the account) with POLICY_JSON
as its inline policy, assumes it through STS and prints its temporary credentials as JSON
({"AccessKeyId", "SecretAccessKey", "SessionToken", "Arn"}): an ASIA… key that is valid only
with its session token, as an instance role's or a Lambda function's credentials are.

`roles.py revoke ROLE RESOURCE` removes RESOURCE from every statement of the inline policies of
the role whose name contains ROLE (a statement left without resources is dropped), as a template
without that grant would deploy it, and prints what it removed; it fails when there was nothing
to remove, so a test cannot revoke a grant that was never there.

Run with the moto server's environment (AWS_ENDPOINT_URL and the administrator's credentials).
"""

import ast
import json
import sys

import boto3


def client(name):
    return boto3.client(name, region_name="us-east-1")


def assume(name, policy):
    iam = client("iam")
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}],
    }
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=name, PolicyName="grants", PolicyDocument=policy)
    creds = client("sts").assume_role(RoleArn=arn, RoleSessionName=f"{name}-session")["Credentials"]
    out = {k: creds[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}
    out["Arn"] = arn
    json.dump(out, sys.stdout)
    return 0


def revoke(role_part, resource):
    iam = client("iam")
    removed = []
    for role in iam.list_roles()["Roles"]:
        name = role["RoleName"]
        if role_part not in name:
            continue
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            doc = iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
            if isinstance(doc, str):
                # moto answers a policy its CloudFormation made as the Python text of a dict.
                try:
                    doc = json.loads(doc)
                except ValueError:
                    doc = ast.literal_eval(doc)
            kept = []
            for statement in doc.get("Statement", []):
                resources = statement.get("Resource", [])
                resources = [resources] if isinstance(resources, str) else resources
                left = [r for r in resources if r != resource]
                if len(left) != len(resources):
                    removed.append({"role": name, "policy": policy, "sid": statement.get("Sid", ""), "resource": resource})
                if left:
                    statement["Resource"] = left
                    kept.append(statement)
                elif not resources and "NotResource" in statement:
                    kept.append(statement)
            if len(removed) and any(r["role"] == name and r["policy"] == policy for r in removed):
                doc["Statement"] = kept
                # SAM writes its policy templates without a Version; PutRolePolicy needs one (the
                # statements use no policy variables, so the language version changes nothing).
                doc.setdefault("Version", "2012-10-17")
                iam.put_role_policy(RoleName=name, PolicyName=policy, PolicyDocument=json.dumps(doc))
    if not removed:
        print(f"no role whose name contains {role_part} is granted {resource}", file=sys.stderr)
        return 1
    json.dump(removed, sys.stdout)
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"assume": assume, "revoke": revoke}[command](*args))
