"""moto's server with what kiln needs and moto 5 lacks, each written to AWS's documented behaviour.

1. DescribeInstanceInformation (SSM).

Every instance moto's EC2 reports running in the region answers as a managed instance with its
agent Online (moto runs no SSM agent; it also reports every command as Success). Filters on
InstanceIds are honoured.

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

from moto.core.responses import ActionResult
from moto.ec2.exceptions import InvalidTaggableResourceType
from moto.ec2.models import ec2_backends
from moto.ec2.models.amis import AmiBackend
from moto.ec2.models.iam_instance_profile import IamInstanceProfileAssociationBackend
from moto.ec2.models.instances import InstanceBackend
from moto.ec2.responses.amis import AmisResponse
from moto.stepfunctions.models import StateMachine
from moto.ssm.responses import SimpleSystemManagerResponse


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
