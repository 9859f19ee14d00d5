"""Instance profiles whose roles are not the stack's builder role, made as the account's
administrator for tests/integration/refusals.rs (the Rust SDKs the tests use have no IAM client):

- `outsider`: a role of its own, trusted by EC2 (someone else's instance role);
- `scheduler`: the stack's SchedulerRole (a role of the stack, but not one an instance may get).

Prints {"outsider": {"role": ARN, "profile": NAME}, "scheduler": {...}}.
Usage: outsider_profiles.py SCHEDULER_ROLE_ARN   (AWS_ENDPOINT_URL and credentials from the env)
"""

import json
import sys

import boto3

EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ],
}


def main(scheduler_role_arn):
    iam = boto3.client("iam", region_name="us-east-1")
    outsider = iam.create_role(RoleName="someone-elses-instance-role", AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
    out = {}
    for key, profile, role_name, role_arn in [
        ("outsider", "someone-elses-profile", "someone-elses-instance-role", outsider["Role"]["Arn"]),
        ("scheduler", "scheduler-role-profile", scheduler_role_arn.rsplit("/", 1)[-1], scheduler_role_arn),
    ]:
        iam.create_instance_profile(InstanceProfileName=profile)
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role_name)
        out[key] = {"role": role_arn, "profile": profile}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
