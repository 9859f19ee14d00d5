"""moto_gaps' DescribeInstanceInformation refuses what AWS refuses: an instance's SSM agent is
Online only when its instance profile's role may register (by action, decided by the IAM
evaluator) and its subnet reaches the SSM endpoints. Each refused case has its control, the same
instance shape that differs in the one thing the rule names, answering Online.

Run by tests/integration/aws.rs with moto's Python and KILN_AUTHZ_MODULES; prints one line per
case and exits non-zero on the first case that answers wrong.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moto_gaps  # noqa: E402,F401  (the gaps filled in-process)
import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

REGION = "us-east-1"
EMPTY_TRUST = json.dumps({"Version": "2012-10-17", "Statement": []})


def profile(iam, name, actions):
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=EMPTY_TRUST)
    if actions:
        document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_role_policy(RoleName=name, PolicyName="agent", PolicyDocument=json.dumps(document))
    iam.create_instance_profile(InstanceProfileName=name)
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)


def main():
    failures = 0
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        ssm = boto3.client("ssm", region_name=REGION)
        iam = boto3.client("iam", region_name=REGION)
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

        def launch(**kwargs):
            out = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro", **kwargs)
            return out["Instances"][0]["InstanceId"]

        def online():
            listed = ssm.describe_instance_information()["InstanceInformationList"]
            return {i["InstanceId"] for i in listed if i["PingStatus"] == "Online"}

        # The default VPC is AWS's: an internet gateway, 0.0.0.0/0 to it in the main route table.
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "association.main", "Values": ["true"]}])
        routes = {(r.get("DestinationCidrBlock"), (r.get("GatewayId") or "")[:4]) for r in main["RouteTables"][0]["Routes"]}
        assert ("0.0.0.0/0", "igw-") in routes, f"the default VPC's main route table: {routes}"

        profile(iam, "agent", ["ssm:UpdateInstanceInformation", "ec2messages:GetMessages", "ec2messages:AcknowledgeMessage", "ec2messages:SendReply"])
        profile(iam, "agent-wildcards", ["ssm:UpdateInstanceInformation", "ec2messages:*"])
        profile(iam, "no-ec2messages", ["ssm:UpdateInstanceInformation"])
        profile(iam, "no-register", ["ec2messages:*"])
        profile(iam, "no-policy", [])
        iam.create_instance_profile(InstanceProfileName="no-role")
        private_vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        private = ec2.create_subnet(VpcId=private_vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
        def behind_a_nat(cidr, nat_reaches_the_internet):
            """A private subnet whose 0.0.0.0/0 goes to a NAT gateway in a public subnet of the same
            VPC; that public subnet routes to an internet gateway only when asked."""
            vpc_id = ec2.create_vpc(CidrBlock=f"{cidr}.0.0/16")["Vpc"]["VpcId"]
            public = ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"{cidr}.0.0/24")["Subnet"]["SubnetId"]
            private_subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"{cidr}.1.0/24")["Subnet"]["SubnetId"]
            if nat_reaches_the_internet:
                igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
                ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc_id)
                out = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
                ec2.create_route(RouteTableId=out, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
                ec2.associate_route_table(RouteTableId=out, SubnetId=public)
            nat = ec2.create_nat_gateway(SubnetId=public, AllocationId=ec2.allocate_address(Domain="vpc")["AllocationId"])
            table = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
            ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat["NatGateway"]["NatGatewayId"])
            ec2.associate_route_table(RouteTableId=table, SubnetId=private_subnet)
            return private_subnet

        behind_nat = behind_a_nat("10.8", True)
        behind_stranded_nat = behind_a_nat("10.7", False)

        cases = [
            # (what, instance, expected Online)
            ("a profile whose role may register, default subnet", launch(IamInstanceProfile={"Name": "agent"}), True),
            ("the same with ec2messages:*", launch(IamInstanceProfile={"Name": "agent-wildcards"}), True),
            ("no instance profile", launch(), False),
            ("a profile without a role", launch(IamInstanceProfile={"Name": "no-role"}), False),
            ("a role without policies", launch(IamInstanceProfile={"Name": "no-policy"}), False),
            ("a role without ec2messages", launch(IamInstanceProfile={"Name": "no-ec2messages"}), False),
            ("a role without ssm:UpdateInstanceInformation", launch(IamInstanceProfile={"Name": "no-register"}), False),
            ("a subnet with no way out", launch(IamInstanceProfile={"Name": "agent"}, SubnetId=private), False),
            ("a subnet behind a NAT gateway in a public subnet", launch(IamInstanceProfile={"Name": "agent"}, SubnetId=behind_nat), True),
            ("a subnet behind a NAT gateway with no way out", launch(IamInstanceProfile={"Name": "agent"}, SubnetId=behind_stranded_nat), False),
        ]
        answered = online()
        for what, instance, expected in cases:
            got = instance in answered
            print(f"{'ok  ' if got == expected else 'FAIL'} {what}: Online={got}, expected {expected}")
            failures += got != expected
        # The private subnet with interface endpoints for the three services: without private DNS
        # the agent still resolves the public names (refused); with it, Online (the control).
        isolated = cases[7][1]
        for private_dns, expected in ((False, False), (True, True)):
            for service in ("ssm", "ssmmessages", "ec2messages"):
                ec2.create_vpc_endpoint(
                    VpcId=private_vpc,
                    ServiceName=f"com.amazonaws.{REGION}.{service}",
                    VpcEndpointType="Interface",
                    SubnetIds=[private],
                    PrivateDnsEnabled=private_dns,
                )
            got = isolated in online()
            print(f"{'ok  ' if got == expected else 'FAIL'} the same subnet with ssm, ssmmessages and ec2messages endpoints, private DNS {private_dns}: Online={got}, expected {expected}")
            failures += got != expected
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
