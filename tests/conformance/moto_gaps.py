"""moto's server with what kiln needs and moto 5 lacks, each written to AWS's documented behaviour.

1. DescribeInstanceInformation (SSM), and the default VPC's way out.

moto runs no SSM agent (it also reports every command as Success). A running instance answers
here as a managed instance with its agent Online only when AWS's agent could register: its
instance profile's role is allowed ssm:UpdateInstanceInformation and ec2messages:GetMessages,
AcknowledgeMessage and SendReply — each decided by the IAM policy evaluator
(tests/rehearsal/authorize.cjs, @cloud-copilot/iam-simulate) on the role's policies as moto holds
them, by action, not by policy name — and its subnet reaches the SSM endpoints: a 0.0.0.0/0 route
to an internet gateway with a public IP, or to a public NAT gateway whose own subnet routes to an
internet gateway, or the VPC has interface endpoints for ssm, ssmmessages and ec2messages with
private DNS. (Not modelled: permissions boundaries, prefix-list and transit routes, Default Host
Management Configuration.) Any other instance is absent from the answer, as AWS leaves
out an instance whose agent never registered. Without the evaluator (KILN_AUTHZ_MODULES unset) no
instance is Online. Filters on InstanceIds are honoured.

AWS's default VPC has an internet gateway and a 0.0.0.0/0 route in its main route table; moto's
has neither, so both are added when moto makes it.

5. The `amazon` owner alias (DescribeImages Owners=amazon): moto gives it to every image it loads
at start (Canonical's included); AWS gives it to images of Amazon's own accounts only, so a
`parent.filter` with owners [amazon] never picks another publisher's newer image. Here the alias
stays only on images of Amazon's accounts.

2. Tags at creation on images: CreateImage's `TagSpecification` for `snapshot` (moto raises
NotImplementedError, a 500) and CopyImage's `TagSpecification` for `image` and `snapshot` (moto
drops them). AWS applies them to the new image and its snapshots in the same call, which is what
lets a policy allow ec2:CreateTags only with `ec2:CreateAction`.

4. ClientToken on RunInstances and CopyImage (moto ignores it): a request repeated with the same
token returns what the first one made, as AWS's idempotency documentation describes, instead of
a second instance or copy. This is what makes a retried Lambda with its original input safe. A
replayed RunInstances with an instance profile keeps the instance's association (moto's response
handler would associate the profile again and answer IncorrectState).

3. CloudFormation's `DefinitionSubstitutions` on AWS::StepFunctions::StateMachine (moto stores
the definition with its `${Name}`s unreplaced): each `${Name}` replaced by its resolved value, as
CloudFormation does before creating the state machine.

Everything else is moto, unchanged. Every moto-backed test runs this server; run as
`python moto_gaps.py -H 127.0.0.1 -p PORT`.
"""

import json
import os
import subprocess
import threading

from moto.core.responses import ActionResult
from moto.ec2.exceptions import InvalidTaggableResourceType
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import AmiBackend
from moto.ec2.models.iam_instance_profile import IamInstanceProfileAssociationBackend
from moto.ec2.models.instances import InstanceBackend
from moto.ec2.models.vpcs import VPCBackend
from moto.iam.models import iam_backends
from moto.ec2.responses.amis import AmisResponse
from moto.stepfunctions.models import StateMachine
from moto.ssm.responses import SimpleSystemManagerResponse


class Evaluator:
    """One node process running tests/rehearsal/authorize.cjs; one question at a time."""

    def __init__(self):
        modules = os.environ.get("KILN_AUTHZ_MODULES", "")
        env = dict(os.environ)
        env["NODE_PATH"] = modules
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [os.environ.get("KILN_AUTHZ_NODE", "node"), os.path.join(here, "..", "rehearsal", "authorize.cjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=os.path.dirname(modules) if modules else here,
            text=True,
        )
        self.lock = threading.Lock()

    def decide(self, question):
        with self.lock:
            self.proc.stdin.write(json.dumps(question) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            return {"result": "Error", "why": "the evaluator exited"}
        return json.loads(line)


_EVALUATOR = None
_EVALUATOR_LOCK = threading.Lock()


def evaluator():
    """The IAM evaluator (started on first use), or None without KILN_AUTHZ_MODULES."""
    global _EVALUATOR
    with _EVALUATOR_LOCK:
        if _EVALUATOR is None and os.environ.get("KILN_AUTHZ_MODULES"):
            _EVALUATOR = Evaluator()
        return _EVALUATOR


def role_policies(account, partition, role_arn):
    """The role's name and its identity policies (inline and managed) as moto holds them."""
    role = iam_backends[account][partition].get_role_by_arn(role_arn)
    out = [
        {"name": f"inline:{name}", "policy": json.loads(doc) if isinstance(doc, str) else doc}
        for name, doc in role.policies.items()
    ]
    for arn, policy in role.managed_policies.items():
        version = next(v for v in policy.versions if v.is_default)
        doc = version.document
        out.append({"name": arn, "policy": json.loads(doc) if isinstance(doc, str) else doc})
    return role.name, out


# What the SSM agent calls to register and to receive Run Command (AWS's documentation of the
# agent's permissions; AmazonSSMManagedInstanceCore grants them).
AGENT_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ec2messages:GetMessages",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:SendReply",
)


def agent_can_register(ec2, instance):
    """Whether AWS's SSM agent on `instance` could register: (True, "") or (False, why)."""
    association = ec2.iam_instance_profile_associations.get(instance.id)
    if association is None:
        return False, "no instance profile"
    roles = [r.arn for r in association.iam_instance_profile.roles]
    if not roles:
        return False, "the instance profile has no role"
    judge = evaluator()
    if judge is None:
        return False, "no IAM evaluator (KILN_AUTHZ_MODULES unset)"
    account, partition = ec2.account_id, ec2.partition
    role_name, policies = role_policies(account, partition, roles[0])
    principal = f"arn:{partition}:sts::{account}:assumed-role/{role_name}/{instance.id}"
    instance_arn = f"arn:{partition}:ec2:{ec2.region_name}:{account}:instance/{instance.id}"
    for action in AGENT_ACTIONS:
        decision = judge.decide(
            {
                "principal": principal,
                "action": action,
                "resource": instance_arn if action.startswith("ssm:") else "*",
                "accountId": account,
                "context": {
                    "aws:RequestedRegion": ec2.region_name,
                    "aws:PrincipalArn": roles[0],
                    "aws:PrincipalAccount": account,
                    "aws:SecureTransport": "true",
                    "ec2:SourceInstanceARN": instance_arn,
                },
                "identityPolicies": policies,
            }
        )
        if decision["result"] != "Allowed":
            return False, f"{role_name} may not {action} ({decision['result']})"
    return reaches_ssm(ec2, instance)


def route_table_of(ec2, subnet):
    """The subnet's route table: its explicit association, else its VPC's main table."""
    tables = [t for t in ec2.route_tables.values() if t.vpc_id == subnet.vpc_id]
    explicit = [t for t in tables if subnet.id in t._associations.values()]
    main = [t for t in tables if t.main_association_id is not None]
    return (explicit or main or [None])[0]


def default_route(ec2, subnet):
    """The subnet's 0.0.0.0/0 route, or None."""
    table = route_table_of(ec2, subnet)
    for route in table.routes if table is not None else []:
        if route.destination_cidr_block == "0.0.0.0/0":
            return route
    return None


def to_internet_gateway(route):
    return route is not None and route.gateway is not None and route.gateway.id.startswith("igw-")


def reaches_ssm(ec2, instance):
    """Whether the instance's subnet reaches the SSM endpoints: (True, "") or (False, why). Interface
    endpoints for ssm, ssmmessages and ec2messages with private DNS (the agent resolves the
    public names); else a 0.0.0.0/0 route to an internet gateway with a public IP, or to a public
    NAT gateway whose own subnet routes to an internet gateway."""
    subnet = ec2.get_subnet(instance.subnet_id)
    services = {
        e.service_name
        for e in ec2.vpc_end_points.values()
        if e.vpc_id == subnet.vpc_id and e.private_dns_enabled
    }
    if all(f"com.amazonaws.{ec2.region_name}.{s}" in services for s in ("ssm", "ssmmessages", "ec2messages")):
        return True, ""
    route = default_route(ec2, subnet)
    if to_internet_gateway(route) and instance.public_ip:
        return True, ""
    nat = route.nat_gateway if route is not None else None
    if nat is not None and nat.connectivity_type != "private":
        if to_internet_gateway(default_route(ec2, ec2.get_subnet(nat.subnet_id))):
            return True, ""
    return False, f"{subnet.id} has no way to the SSM endpoints (no 0.0.0.0/0 route to an internet gateway with a public IP or to a public NAT that has one, no ssm/ssmmessages/ec2messages endpoints with private DNS)"


def describe_instance_information(self):
    wanted = set()
    for f in self._get_param("Filters") or []:
        if f.get("Key") == "InstanceIds":
            wanted.update(f.get("Values") or [])
    for f in self._get_param("InstanceInformationFilterList") or []:
        if f.get("key") == "InstanceIds":
            wanted.update(f.get("valueSet") or [])
    ec2 = ec2_backends[self.current_account][self.region]
    found = []
    for reservation in ec2.reservations.values():
        for instance in reservation.instances:
            if instance.state != "running" or (wanted and instance.id not in wanted):
                continue
            if not agent_can_register(ec2, instance)[0]:
                continue
            found.append(
                {
                    "InstanceId": instance.id,
                    "PingStatus": "Online",
                    "PlatformType": "Linux",
                    "AgentVersion": "3.3.0.0",
                    "ResourceType": "EC2Instance",
                }
            )
    return json.dumps({"InstanceInformationList": found})


SimpleSystemManagerResponse.describe_instance_information = describe_instance_information

_create_default_vpc = VPCBackend.create_default_vpc


def create_default_vpc(self):
    vpc = _create_default_vpc(self)
    igw = self.create_internet_gateway()
    self.attach_internet_gateway(igw.id, vpc.id)
    main = next(t for t in self.route_tables.values() if t.vpc_id == vpc.id and t.main_association_id is not None)
    self.create_route(main.id, "0.0.0.0/0", gateway_id=igw.id)
    return vpc


VPCBackend.create_default_vpc = create_default_vpc

# The accounts whose public images carry the `amazon` owner alias (Amazon Linux, Windows, and
# AWS's other image-publishing accounts).
AMAZON_IMAGE_OWNERS = {
    "137112412989", "591542846629", "801119661308", "102837901569",
    "013907871322", "206029621532", "286198878708", "443319210888",
}

_load_amis = AmiBackend._load_amis


def load_amis(self):
    _load_amis(self)
    for ami in self.amis.values():
        if ami.owner_alias == "amazon" and ami.owner_id not in AMAZON_IMAGE_OWNERS:
            ami.owner_alias = None


AmiBackend._load_amis = load_amis


def _split_specs(specs):
    image, snapshot = [], []
    for spec in specs or []:
        kind = spec.get("ResourceType")
        if kind == "image":
            image += spec.get("Tags", [])
        elif kind == "snapshot":
            snapshot += spec.get("Tags", [])
        else:
            raise InvalidTaggableResourceType(kind)
    return image, snapshot


def _tag(ami, image_tags, snapshot_tags):
    for t in image_tags:
        ami.add_tag(t["Key"], t["Value"])
    for t in snapshot_tags:
        ami.ebs_snapshot.add_tag(t["Key"], t["Value"])


_create_image = AmiBackend.create_image
_copy_image = AmiBackend.copy_image


def create_image(self, instance_id, name, description, tag_specifications):
    image_tags, snapshot_tags = _split_specs(tag_specifications)
    ami = _create_image(
        self,
        instance_id,
        name,
        description,
        tag_specifications=[{"ResourceType": "image", "Tags": image_tags}],
    )
    _tag(ami, [], snapshot_tags)
    return ami


AmiBackend.create_image = create_image


_copies_by_token = {}


def copy_image_response(self):
    image_tags, snapshot_tags = _split_specs(self._get_param("TagSpecifications", []))
    self.error_on_dryrun()
    token = self._get_param("ClientToken")
    key = (self.current_account, self.region, token)
    if token and key in _copies_by_token and _copies_by_token[key] in self.ec2_backend.amis:
        return ActionResult({"ImageId": _copies_by_token[key]})
    ami = _copy_image(
        self.ec2_backend,
        self._get_param("SourceImageId"),
        self._get_param("SourceRegion"),
        self._get_param("Name"),
        self._get_param("Description"),
    )
    _tag(ami, image_tags, snapshot_tags)
    if token:
        _copies_by_token[key] = ami.id
    return ActionResult({"ImageId": ami.id})


AmisResponse.copy_image = copy_image_response

_run_instances = InstanceBackend.run_instances


def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
    token = kwargs.get("client_token")
    if token and token != "ABCDE":  # moto's default when the request has none
        for reservation in self.reservations.values():
            if any(getattr(i, "client_token", None) == token for i in reservation.instances):
                return reservation
    return _run_instances(self, image_id, count, user_data, security_group_names, **kwargs)


InstanceBackend.run_instances = run_instances

_associate = IamInstanceProfileAssociationBackend.associate_iam_instance_profile


def associate_iam_instance_profile(self, instance_id, iam_instance_profile_name=None, iam_instance_profile_arn=None):
    existing = self.iam_instance_profile_associations.get(instance_id)
    if existing is not None:
        return existing
    return _associate(self, instance_id, iam_instance_profile_name, iam_instance_profile_arn)


IamInstanceProfileAssociationBackend.associate_iam_instance_profile = associate_iam_instance_profile



_create_state_machine = StateMachine.create_from_cloudformation_json.__func__


def create_state_machine_from_cloudformation(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs):
    properties = cloudformation_json["Properties"]
    definition = properties.get("DefinitionString", "")
    for name, value in (properties.get("DefinitionSubstitutions") or {}).items():
        definition = definition.replace("${" + name + "}", str(value))
    properties["DefinitionString"] = definition
    return _create_state_machine(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)


StateMachine.create_from_cloudformation_json = classmethod(create_state_machine_from_cloudformation)


if __name__ == "__main__":
    from moto.server import main

    main()
