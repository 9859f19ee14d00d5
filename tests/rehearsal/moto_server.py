"""moto's server as the deployment rehearsal uses it: every request signed with an assumed role's
credentials is authorized as AWS would authorize it before moto sees it.

moto enforces no IAM. Here each HTTP request is turned into the IAM requests AWS evaluates for it
(action, resource ARNs, and the condition keys AWS sets: aws:RequestTag/*, aws:TagKeys,
aws:ResourceTag/*, ec2:ResourceTag/*, ssm:resourceTag/*, ec2:CreateAction, iam:PassedToService,
aws:RequestedRegion…), each evaluated against the role's policies as moto holds them (the stack's
deployed roles) by @cloud-copilot/iam-simulate (tests/rehearsal/authorize.cjs). A denied request
gets AWS's AccessDenied answer and moto never runs it. Every decision is appended as one JSON line
to $KILN_AUTHZ_LOG; a request this module cannot map is recorded as `Unmapped` and denied, so a
new call cannot slip through unchecked.

Every request signed with an assumed role's key has its SigV4 signature verified first, header or
presigned, as AWS verifies it (the canonical request rebuilt from what arrived, the role's secret
key, the 15-minute clock skew, a presigned URL's expiry): a wrong one gets the service's answer
(SignatureDoesNotMatch; InvalidSignatureException from the JSON APIs; AccessDenied "Request has
expired") and is recorded as such. moto checks no signature, and
kiln signs its artifact-bucket calls itself (shared/src/aws/objects.rs).

Who signed is decided first, as AWS decides it (tests/rehearsal/identity.py): an unsigned request,
a key that is neither an assumed role's nor the test harness's administrator (`testing`), a
temporary key without its session token or with another one, or an expired session, is refused
with the service's own code (AccessDenied, InvalidAccessKeyId, AuthFailure,
UnrecognizedClientException, InvalidClientTokenId, InvalidToken, ExpiredToken…) and recorded as
`CredentialsRefused`. The administrator's requests are signature-checked too, then run
unevaluated, as an account administrator's would be allowed.

Faults (port-level, for what moto cannot show: capacity, a failed command, a failed API call):
$KILN_FAULTS names a JSON file holding a list of faults, read on every request; a fault applies to
an authorized request whose role name contains `role` and whose operation is `operation`
(optionally `region`):
  {"role": "...", "operation": "RunInstances", "error": {"status": 500, "code": "...", "message": "..."}}
      answers that AWS error instead of running the request;
  {"role": "...", "operation": "AmazonSSM.GetCommandInvocation", "commandStatus": "Failed"}
      runs it and reports the command Failed (exit code 1), as SSM does when a script fails;
  {"role": "...", "operation": "DescribeImages", "imageState": "failed"}
      runs it and reports every image in that state (moto's images never fail; AWS's can).
A fault with "count": N applies to the first N matching requests only (a transient fault).
Each applied fault is recorded in the log as {"fault": ...}.

Lambda Invoke is authorized as lambda:InvokeFunction on the function's ARN, with the function's
resource policy; only DryRun invocations are answered (204, or ResourceNotFoundException), by this
layer: moto would run the function in Docker, and the rehearsal runs each bootstrap through its
Lambda Runtime API emulator. The test's engine asks a DryRun signed with the state machine role's
assumed-role credentials before each Task invocation, as Step Functions invokes a function as that
role (tests/integration/rehearsal.rs, `Bootstraps`).

SendTaskSuccess (authorized like any call) is appended to $KILN_TASK_ANSWERS for the test's
engine, which runs the executions in place of moto's Step Functions.

Also DescribeInstanceInformation, which moto lacks (tests/conformance/moto_gaps.py).

Run as `python moto_server.py -H 127.0.0.1 -p PORT` with KILN_AUTHZ_LOG, KILN_AUTHZ_NODE (node)
and KILN_AUTHZ_MODULES (a node_modules folder holding @cloud-copilot/iam-simulate).
"""

import datetime
import hashlib
import hmac
import io
import json
import os
import re
import sys
import threading
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "conformance"))

import moto_gaps  # noqa: E402,F401  (patches moto's SSM responses)
import identity  # noqa: E402  (who signed: the administrator, an assumed role, or refused)
import delivery  # noqa: E402  (EventBridge and SNS delivering to Lambda and SNS, authorized)
from moto.ec2.models import ec2_backends  # noqa: E402
from moto.iam.models import iam_backends  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication  # noqa: E402
from moto.s3.models import FakeBucket, s3_backends  # noqa: E402
from moto.sts.models import sts_backends  # noqa: E402

ACCOUNT = "123456789012"
PARTITION = "aws"


# The IAM evaluator (authorize.cjs) is moto_gaps' own, which also decides whether an instance's
# SSM agent could register; one node process answers both.
EVALUATOR = None
LOG_LOCK = threading.Lock()


def record(entry):
    path = os.environ.get("KILN_AUTHZ_LOG")
    if not path:
        return
    with LOG_LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


# --- who is asking -------------------------------------------------------------------------------

CREDENTIAL = re.compile(r"Credential=([^/]+)/\d+/([^/]+)/([^/]+)/aws4_request")


def signer(environ, query):
    """(access key, region, service) of the request's SigV4 signature, header or presigned."""
    m = CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    if m:
        return m.group(1), m.group(2), m.group(3)
    cred = query.get("X-Amz-Credential")
    if cred:
        parts = cred.split("/")
        if len(parts) >= 4:
            return parts[0], parts[2], parts[3]
    return None, None, None



# --- is the signature right ----------------------------------------------------------------------

UNRESERVED = "-_.~"


def uri_encode(text, keep_slash=False):
    return urllib.parse.quote(text, safe=UNRESERVED + ("/" if keep_slash else ""))


def canonical_query(raw, drop=()):
    pairs = []
    for part in raw.split("&") if raw else []:
        name, _, value = part.partition("=")
        name, value = urllib.parse.unquote(name), urllib.parse.unquote(value)
        if name not in drop:
            pairs.append((uri_encode(name), uri_encode(value)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def header_value(environ, name):
    key = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}.get(
        name, "HTTP_" + name.upper().replace("-", "_"))
    return " ".join((environ.get(key) or "").split())


def signature_problem(environ, body, query, service, secret):
    """None if the request's SigV4 signature is the one its secret key makes, else why not."""
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
    raw_path, _, raw_query = raw_uri.partition("?")
    auth = environ.get("HTTP_AUTHORIZATION", "")
    now = datetime.datetime.now(datetime.timezone.utc)
    if auth:
        m = re.match(r"AWS4-HMAC-SHA256 Credential=([^,]+), ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]+)$", auth)
        if not m:
            return "the Authorization header is not SigV4's"
        credential, signed, signature = m.groups()
        amz_date = environ.get("HTTP_X_AMZ_DATE", "")
        payload = environ.get("HTTP_X_AMZ_CONTENT_SHA256") or hashlib.sha256(body).hexdigest()
        if re.fullmatch("[0-9a-f]{64}", payload) and payload != hashlib.sha256(body).hexdigest():
            return "x-amz-content-sha256 is not the body's SHA-256"
        query_text = canonical_query(raw_query)
        try:
            at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return "x-amz-date is missing or malformed"
        if abs((now - at).total_seconds()) > 900:
            return "the signature's time is more than 15 minutes from the server's"
    else:
        credential = query.get("X-Amz-Credential", "")
        signed = query.get("X-Amz-SignedHeaders", "")
        signature = query.get("X-Amz-Signature", "")
        amz_date = query.get("X-Amz-Date", "")
        payload = "UNSIGNED-PAYLOAD"
        query_text = canonical_query(raw_query, drop=("X-Amz-Signature",))
        try:
            at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
            expires = int(query.get("X-Amz-Expires", ""))
        except ValueError:
            return "X-Amz-Date or X-Amz-Expires is missing or malformed"
        if expires > 7 * 24 * 3600:
            return "X-Amz-Expires must be less than a week (in seconds)"
        if (now - at).total_seconds() > expires:
            return "Request has expired"
    scope = credential.split("/", 1)[1] if "/" in credential else ""
    path = raw_path if service == "s3" else uri_encode(raw_path, keep_slash=True)
    headers = "".join(f"{h}:{header_value(environ, h)}\n" for h in signed.split(";"))
    canonical = "\n".join([environ.get("REQUEST_METHOD", "GET"), path, query_text, headers, signed, payload])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    if hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest() != signature:
        return "The request signature we calculated does not match the signature you provided"
    return None


def unsigned_service(app, environ):
    """The service an unsigned request is for, as moto's dispatcher routes it (for the protocol
    of the refusal)."""
    host = app.infer_service_region_host(environ, environ.get("PATH_INFO", "/")) or "s3."
    return host.split(".", 1)[0]


def assumed_role(access_key):
    for account in list(sts_backends.keys()):
        backend = sts_backends[account]["global"]
        for role in backend.assumed_roles:
            if role.access_key_id == access_key:
                return role
    return None


def role_policies(role_arn):
    return moto_gaps.role_policies(ACCOUNT, PARTITION, role_arn)


# --- what the request asks for ---------------------------------------------------------------------


def ec2_tags(region, resource_id):
    try:
        return dict(ec2_backends[ACCOUNT][region].tags.get(resource_id, {}))
    except KeyError:
        return {}


def ec2_arn(region, resource_id):
    kind = {
        "i": "instance",
        "ami": "image",
        "snap": "snapshot",
        "vol": "volume",
        "lt": "launch-template",
        "subnet": "subnet",
        "sg": "security-group",
        "vpc": "vpc",
        "eni": "network-interface",
    }.get(resource_id.split("-", 1)[0], "unknown")
    if kind in ("image", "snapshot"):
        return f"arn:{PARTITION}:ec2:{region}::{kind}/{resource_id}"
    return f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}:{kind}/{resource_id}"


def resource_tag_keys(tags, prefixes=("aws:ResourceTag", "ec2:ResourceTag")):
    ctx = {}
    for k, v in tags.items():
        for p in prefixes:
            ctx[f"{p}/{k}"] = v
    return ctx


def request_tag_keys(tags):
    if not tags:
        return {}
    ctx = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    ctx["aws:TagKeys"] = sorted(tags)
    return ctx


def indexed(params, prefix):
    """EC2 query lists: Prefix.1, Prefix.2 … → values."""
    out = []
    i = 1
    while f"{prefix}.{i}" in params:
        out.append(params[f"{prefix}.{i}"])
        i += 1
    return out


def tag_specifications(params):
    """TagSpecification.N.ResourceType / .Tag.M.Key|Value → {resource type: {key: value}}."""
    specs = {}
    i = 1
    while f"TagSpecification.{i}.ResourceType" in params:
        kind = params[f"TagSpecification.{i}.ResourceType"]
        tags = {}
        j = 1
        while f"TagSpecification.{i}.Tag.{j}.Key" in params:
            tags[params[f"TagSpecification.{i}.Tag.{j}.Key"]] = params.get(
                f"TagSpecification.{i}.Tag.{j}.Value", ""
            )
            j += 1
        specs[kind] = tags
        i += 1
    return specs


def new_resources_with_tags(action, region, specs, kinds, create_action):
    """The resources a create call makes (ARN with `*`), each with its request tags, and the
    ec2:CreateTags that tagging them at creation is authorized as."""
    out = []
    for kind in kinds:
        account = "" if kind in ("image", "snapshot") else ACCOUNT
        arn = f"arn:{PARTITION}:ec2:{region}:{account}:{kind}/*"
        tags = specs.get(kind, {})
        out.append((action, arn, request_tag_keys(tags)))
        if tags:
            ctx = request_tag_keys(tags)
            ctx["ec2:CreateAction"] = create_action
            out.append(("ec2:CreateTags", arn, ctx))
    return out


def instance_profile_role(name_or_arn):
    iam = iam_backends[ACCOUNT][PARTITION]
    name = name_or_arn.rsplit("/", 1)[-1]
    for profile in iam.instance_profiles.values():
        if profile.name == name:
            return [r.arn for r in profile.roles]
    return []


def key_arn(region, key):
    """The key ARN KMS authorizes a key id, key ARN or alias as (an alias names a key of its own
    account and region; the rehearsal gives each alias a key ARN by name)."""
    if key.startswith("arn:"):
        return key.replace(":alias/", ":key/alias-")
    if key.startswith("alias/"):
        return f"arn:{PARTITION}:kms:{region}:{ACCOUNT}:key/alias-{key[len('alias/'):]}"
    return f"arn:{PARTITION}:kms:{region}:{ACCOUNT}:key/{key}"


def kms_on_behalf(region, keys, encrypt):
    """What EC2 asks KMS for, as the caller, to encrypt volumes or a copy with a customer managed
    key: each evaluated against the caller's role with kms:ViaService, as KMS evaluates it."""
    via = {"kms:ViaService": f"ec2.{region}.amazonaws.com"}
    actions = ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"]
    if encrypt:
        actions.append("kms:Encrypt")
    out = []
    for key in keys:
        if key in ("alias/aws/ebs",):
            continue  # AWS managed: usable by any principal of the account through EC2
        arn = key_arn(region, key)
        out += [(a, arn, dict(via)) for a in actions]
        out.append(("kms:CreateGrant", arn, {**via, "kms:GrantIsForAWSResource": "true"}))
    return out


def default_vpc(region):
    vpc = ec2_backends[ACCOUNT][region].get_default_vpc()
    return vpc.id if vpc else None


def launch_network(region, params):
    """(subnet id, security group ids) a RunInstances launches into, or None if unknown."""
    ec2 = ec2_backends[ACCOUNT][region]
    nic = "NetworkInterface.1."
    subnet = params.get("SubnetId") or params.get(nic + "SubnetId")
    groups = indexed(params, "SecurityGroupId") + indexed(params, nic + "SecurityGroupId")
    for name in indexed(params, "SecurityGroup"):
        group = ec2.get_security_group_from_name(name, vpc_id=None)
        if group is None:
            return None
        groups.append(group.id)
    if not subnet:
        zone = params.get("Placement.AvailabilityZone") or region + "a"
        default = ec2.get_default_subnets().get(zone)
        if default is None:
            return None
        subnet = default.id
    if not groups:
        try:
            vpc = ec2.get_subnet(subnet).vpc_id
        except Exception:  # noqa: BLE001  (moto's not-found error)
            return None
        group = ec2.get_security_group_from_name("default", vpc_id=vpc)
        if group is None:
            return None
        groups = [group.id]
    return subnet, groups


def launch_template_id(region, params):
    """The id of the launch template a RunInstances names (by id or by name), or None."""
    ec2 = ec2_backends[ACCOUNT][region]
    if params.get("LaunchTemplate.LaunchTemplateId"):
        return params["LaunchTemplate.LaunchTemplateId"]
    name = params.get("LaunchTemplate.LaunchTemplateName")
    for template in getattr(ec2, "launch_templates", {}).values():
        if template.name == name:
            return template.id
    return None


# The customer managed keys of the volumes each image was made from, by (region, instance):
# moto's images keep no key (their snapshots come from a blank volume), AWS's snapshots are
# encrypted with their volume's key, which a CopyImage then reads. Noted at CreateImage.
VOLUME_KEYS = {}


def remember_volume_keys(region, instance_id):
    ec2 = ec2_backends[ACCOUNT][region]
    try:
        instance = ec2.get_instance(instance_id)
    except Exception:  # noqa: BLE001  (moto's not-found error)
        return
    keys = set()
    for device in instance.block_device_mapping.values():
        volume = ec2.volumes.get(device.volume_id)
        if volume is not None and volume.kms_key_id:
            keys.add(volume.kms_key_id)
    VOLUME_KEYS[(region, instance_id)] = sorted(keys)


def image_keys(region, image_id):
    """The customer managed keys of an image's snapshots (none for moto's stock images)."""
    ami = ec2_backends[ACCOUNT][region].amis.get(image_id)
    if ami is None or not ami.instance_id:
        return []
    return VOLUME_KEYS.get((region, ami.instance_id), [])


def map_ec2(region, params):
    op = params.get("Action", "")
    action = f"ec2:{op}"
    if op.startswith("Describe"):
        return [(action, "*", {})]
    specs = tag_specifications(params)
    if op == "RunInstances":
        out = new_resources_with_tags(
            action, region, specs, ["instance", "volume", "network-interface"], "RunInstances"
        )
        image = params.get("ImageId", "")
        if image:
            out.append((action, ec2_arn(region, image), resource_tag_keys(ec2_tags(region, image))))
        # The subnet and security groups the instance gets, by their real ids: named at the top
        # or in the primary network interface (kiln names them there), else the default subnet
        # of the zone and the default group of its VPC, as EC2 picks them.
        network = launch_network(region, params)
        if network is None:
            return None  # not what this mapping knows: fail closed
        subnet, groups = network
        out.append((action, ec2_arn(region, subnet), resource_tag_keys(ec2_tags(region, subnet))))
        for g in groups:
            out.append((action, ec2_arn(region, g), resource_tag_keys(ec2_tags(region, g))))
        if params.get("KeyName"):
            out.append((action, f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}:key-pair/{params['KeyName']}", {}))
        if any(k.startswith("LaunchTemplate.") for k in params):
            template = launch_template_id(region, params)
            if template is None:
                return None
            out.append((action, ec2_arn(region, template), resource_tag_keys(ec2_tags(region, template))))
        keys = sorted({v for k, v in params.items() if k.startswith("BlockDeviceMapping.") and k.endswith(".Ebs.KmsKeyId")})
        out += kms_on_behalf(region, keys, encrypt=False)
        profile = params.get("IamInstanceProfile.Name") or params.get("IamInstanceProfile.Arn")
        if profile:
            for role in instance_profile_role(profile):
                out.append(("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"}))
        return out
    if op == "CreateSecurityGroup":
        out = new_resources_with_tags(action, region, specs, ["security-group"], "CreateSecurityGroup")
        vpc = params.get("VpcId") or default_vpc(region)
        if vpc is None:
            return None
        out.append((action, f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}:vpc/{vpc}", resource_tag_keys(ec2_tags(region, vpc))))
        return out
    if op == "CreateImage":
        instance = params.get("InstanceId", "")
        remember_volume_keys(region, instance)
        out = [
            (action, ec2_arn(region, instance), resource_tag_keys(ec2_tags(region, instance)))
        ]
        out += new_resources_with_tags(action, region, specs, ["image", "snapshot"], "CreateImage")
        return out
    if op == "CopyImage":
        source_region = params.get("SourceRegion", region)
        source = params.get("SourceImageId", "")
        out = new_resources_with_tags(action, region, specs, ["image", "snapshot"], "CopyImage")
        ctx = request_tag_keys(specs.get("image", {}))
        ctx.update(resource_tag_keys(ec2_tags(source_region, source)))
        out.append((action, ec2_arn(source_region, source), ctx))
        # Both keys: the source image's snapshots' (read in the source region) and the copy's.
        out += kms_on_behalf(source_region, image_keys(source_region, source), encrypt=False)
        if params.get("KmsKeyId"):
            out += kms_on_behalf(region, [params["KmsKeyId"]], encrypt=True)
        return out
    if op in ("CreateTags", "DeleteTags"):
        tags = {}
        j = 1
        while f"Tag.{j}.Key" in params:
            tags[params[f"Tag.{j}.Key"]] = params.get(f"Tag.{j}.Value", "")
            j += 1
        out = []
        for rid in indexed(params, "ResourceId"):
            ctx = request_tag_keys(tags)
            ctx.update(resource_tag_keys(ec2_tags(region, rid)))
            out.append((action, ec2_arn(region, rid), ctx))
        return out
    ids = {
        "TerminateInstances": lambda: indexed(params, "InstanceId"),
        "StopInstances": lambda: indexed(params, "InstanceId"),
        "StartInstances": lambda: indexed(params, "InstanceId"),
        "RebootInstances": lambda: indexed(params, "InstanceId"),
        "DeregisterImage": lambda: [params.get("ImageId", "")],
        "EnableImageDeprecation": lambda: [params.get("ImageId", "")],
        "DisableImageDeprecation": lambda: [params.get("ImageId", "")],
        "ModifyImageAttribute": lambda: [params.get("ImageId", "")],
        "ModifySnapshotAttribute": lambda: [params.get("SnapshotId", "")],
        "DeleteSnapshot": lambda: [params.get("SnapshotId", "")],
        "CreateLaunchTemplateVersion": lambda: [params.get("LaunchTemplateId", "")],
        "ModifyLaunchTemplate": lambda: [params.get("LaunchTemplateId", "")],
    }.get(op)
    if ids is None:
        return None
    return [
        (action, ec2_arn(region, rid), resource_tag_keys(ec2_tags(region, rid))) for rid in ids()
    ]


def map_json(service, region, target, body):
    op = target.rsplit(".", 1)[-1]
    try:
        p = json.loads(body or b"{}")
    except ValueError:
        p = {}
    if service == "dynamodb":
        table = p.get("TableName")
        if op == "TransactWriteItems":
            out = []
            for item in p.get("TransactItems", []):
                for kind, spec in item.items():
                    act = {
                        "Put": "PutItem",
                        "Update": "UpdateItem",
                        "Delete": "DeleteItem",
                        "ConditionCheck": "ConditionCheckItem",
                    }[kind]
                    arn = f"arn:{PARTITION}:dynamodb:{region}:{ACCOUNT}:table/{spec['TableName']}"
                    out.append((f"dynamodb:{act}", arn, {}))
            return out
        if not table:
            return None
        arn = f"arn:{PARTITION}:dynamodb:{region}:{ACCOUNT}:table/{table}"
        if p.get("IndexName"):
            arn += f"/index/{p['IndexName']}"
        return [(f"dynamodb:{op}", arn, {})]
    if service == "ssm":
        action = f"ssm:{op}"
        if op in ("GetParameter", "PutParameter", "DeleteParameter", "GetParameterHistory"):
            name = p.get("Name", "").lstrip("/")
            # AWS writes public parameters' ARNs without an account; the evaluator's ARN check
            # requires one, so they are evaluated as the caller's (policies match either way
            # only with `*` in the account field, which is what the stack grants).
            owner = ACCOUNT
            ctx = {"ssm:Overwrite": str(bool(p.get("Overwrite"))).lower()} if op == "PutParameter" else {}
            return [(action, f"arn:{PARTITION}:ssm:{region}:{owner}:parameter/{name}", ctx)]
        if op == "GetParameters":
            return [
                (action, f"arn:{PARTITION}:ssm:{region}:{ACCOUNT}:parameter/{n.lstrip('/')}", {})
                for n in p.get("Names", [])
            ]
        if op == "SendCommand":
            doc = p.get("DocumentName", "")
            # Amazon's documents (AWS-*) have no account in AWS's ARNs; as for public
            # parameters, the evaluator needs one.
            owner = ACCOUNT
            out = [(action, f"arn:{PARTITION}:ssm:{region}:{owner}:document/{doc}", {})]
            for i in p.get("InstanceIds", []):
                tags = ec2_tags(region, i)
                out.append(
                    (
                        action,
                        ec2_arn(region, i),
                        resource_tag_keys(tags, ("aws:ResourceTag", "ssm:resourceTag")),
                    )
                )
            if p.get("Targets"):
                out.append((action, f"arn:{PARTITION}:ec2:{region}:{ACCOUNT}:instance/*", {}))
            return out
        if op in ("GetCommandInvocation", "ListCommands", "ListCommandInvocations", "DescribeInstanceInformation"):
            return [(action, "*", {})]
        return None
    if service == "events":
        action = f"events:{op}"
        if op == "PutEvents":
            out = []
            for e in p.get("Entries", []):
                bus = e.get("EventBusName") or "default"
                arn = bus if bus.startswith("arn:") else f"arn:{PARTITION}:events:{region}:{ACCOUNT}:event-bus/{bus}"
                ctx = {"events:source": e.get("Source", ""), "events:detail-type": e.get("DetailType", "")}
                out.append((action, arn, ctx))
            return out
        if op == "ListRules":
            return [(action, "*", {})]
        if op in ("DisableRule", "EnableRule", "DescribeRule", "DeleteRule", "PutRule", "PutTargets", "RemoveTargets", "ListTargetsByRule"):
            name = p.get("Name") or p.get("Rule", "")
            return [(action, f"arn:{PARTITION}:events:{region}:{ACCOUNT}:rule/{name}", {})]
        return None
    if service == "states":
        action = f"states:{op}"
        if op in ("SendTaskSuccess", "SendTaskFailure", "SendTaskHeartbeat"):
            # No resource type: the token is the authority.
            return [(action, "*", {})]
        arn = p.get("stateMachineArn") or p.get("executionArn")
        return [(action, arn, {})] if arn else None
    return None


# Query parameters of a presigned URL (the signature, not the request).
PRESIGNED = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
             "X-Amz-Signature", "X-Amz-Security-Token"}
# Headers that make an object request another IAM action (CopyObject reads its source,
# x-amz-tagging needs s3:PutObjectTagging, a grant or ACL s3:PutObjectAcl): not mapped here.
OTHER_ACTIONS = ("HTTP_X_AMZ_COPY_SOURCE", "HTTP_X_AMZ_TAGGING", "HTTP_X_AMZ_ACL", "HTTP_X_AMZ_GRANT_READ",
                 "HTTP_X_AMZ_GRANT_FULL_CONTROL", "HTTP_X_AMZ_GRANT_READ_ACP", "HTTP_X_AMZ_GRANT_WRITE_ACP",
                 "HTTP_X_AMZ_OBJECT_LOCK_MODE", "HTTP_X_AMZ_OBJECT_LOCK_LEGAL_HOLD")


def map_s3(method, path, query, environ=None):
    environ = environ or {}
    parts = path.lstrip("/").split("/", 1)
    bucket = parts[0]
    key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
    # Names as they arrived: parse_qs drops the empty ones (?tagging, ?acl, ?uploads).
    raw = environ.get("QUERY_STRING")
    names = {urllib.parse.unquote(p.partition("=")[0]) for p in raw.split("&") if p} if raw is not None else set(query)
    asked = names - PRESIGNED - {"x-id"}
    if not bucket:
        return [("s3:ListAllMyBuckets", "*", {})] if not asked else None
    if key:
        # A sub-resource (?tagging, ?acl, ?versionId, ?uploads…) or a copy is another action.
        if any(environ.get(h) for h in OTHER_ACTIONS):
            return None
        if method in ("GET", "HEAD") and not {q for q in asked if not q.startswith("response-")}:
            action = "s3:GetObject"
        elif method in ("PUT", "DELETE") and not asked:
            action = {"PUT": "s3:PutObject", "DELETE": "s3:DeleteObject"}[method]
        else:
            return None
        return [(action, f"arn:{PARTITION}:s3:::{bucket}/{key}", {})]
    listing = {"list-type", "prefix", "continuation-token", "max-keys", "delimiter", "start-after",
               "encoding-type", "fetch-owner"}
    if method in ("GET", "HEAD") and not asked - listing:
        return [("s3:ListBucket", f"arn:{PARTITION}:s3:::{bucket}", {})]
    if method == "PUT" and not asked:
        return [("s3:CreateBucket", f"arn:{PARTITION}:s3:::{bucket}", {})]
    return None


def map_scheduler(region, method, path, query, body):
    m = re.match(r"^/schedules/([^/]+)$", path)
    if not m:
        return None
    name = urllib.parse.unquote(m.group(1))
    try:
        p = json.loads(body or b"{}")
    except ValueError:
        p = {}
    group = query.get("groupName") or p.get("GroupName") or "default"
    arn = f"arn:{PARTITION}:scheduler:{region}:{ACCOUNT}:schedule/{group}/{name}"
    op = {"GET": "GetSchedule", "PUT": "UpdateSchedule", "POST": "CreateSchedule", "DELETE": "DeleteSchedule"}.get(method)
    out = [(f"scheduler:{op}", arn, {})]
    role = (p.get("Target") or {}).get("RoleArn")
    if role and op in ("UpdateSchedule", "CreateSchedule"):
        out.append(("iam:PassRole", role, {"iam:PassedToService": "scheduler.amazonaws.com"}))
    return out


def function_arn(region, name):
    """The ARN Lambda authorizes an invocation of `name` (a name or an ARN, without qualifier) as."""
    if name.startswith("arn:"):
        return ":".join(name.split(":")[:7])
    return f"arn:{PARTITION}:lambda:{region}:{ACCOUNT}:function:{name}"


INVOKE_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")


def map_lambda(region, method, path):
    m = INVOKE_PATH.match(path)
    if not m or method != "POST":
        return None
    return [("lambda:InvokeFunction", function_arn(region, urllib.parse.unquote(m.group(1))), {})]


def lambda_function(resource):
    """moto's function of a function ARN, or None."""
    from moto.awslambda.models import lambda_backends

    region = resource.split(":")[3]
    try:
        return lambda_backends[ACCOUNT][region].get_function(resource)
    except Exception:  # noqa: BLE001  (moto raises its own not-found types)
        return None


def function_policy(resource):
    """A function's resource policy (its AWS::Lambda::Permission statements) as Lambda's
    GetPolicy answers it, or None. moto keeps a permission's request fields (FunctionName, …) in
    the statements CloudFormation made: only the policy language's keys are the policy."""
    fn = lambda_function(resource)
    if fn is None or not fn.policy.statements:
        return None
    policy = json.loads(json.dumps(fn.policy.get_policy()["Policy"]))
    keys = ("Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource", "Condition")
    policy["Statement"] = [{k: v for k, v in st.items() if k in keys} for st in policy.get("Statement", [])]
    return policy


def dry_run(environ, start_response, resource):
    """Lambda's answer to an authorized DryRun invocation: 204, or the function is not there."""
    if lambda_function(resource) is None:
        return error_answer(start_response, "lambda", environ, 404, "ResourceNotFoundException",
                            f"Function not found: {resource}")
    start_response("204 No Content", [("Content-Length", "0")])
    return [b""]


def map_request(service, region, environ, body, query):
    method = environ.get("REQUEST_METHOD", "GET")
    path = environ.get("PATH_INFO", "/")
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:
        return map_json(service, region, target, body)
    if service == "s3":
        return map_s3(method, path, query, environ)
    if service == "scheduler":
        return map_scheduler(region, method, path, query, body)
    if service == "lambda":
        return map_lambda(region, method, path)
    params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
    params.update(query)
    if service == "sts" and params.get("Action") == "GetCallerIdentity":
        return []
    if service == "ec2":
        return map_ec2(region, params)
    return None


def key_policy(resource):
    """A customer managed key's policy as KMS creates it by default: the account delegates to
    IAM, so the caller's identity policy decides (KMS denies any use without a key policy)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{PARTITION}:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


def bucket_policy(resource):
    """The resource policy of what is asked for: a bucket's (from moto), a key's (the default)."""
    if resource.startswith(f"arn:{PARTITION}:kms:"):
        return key_policy(resource)
    if resource.startswith(f"arn:{PARTITION}:lambda:"):
        return function_policy(resource)
    if not resource.startswith("arn:aws:s3:::"):
        return None
    bucket = resource[len("arn:aws:s3:::"):].split("/", 1)[0]
    try:
        b = s3_backends[ACCOUNT][PARTITION].buckets.get(bucket)
    except KeyError:
        return None
    if b is None or not b.policy:
        return None
    return json.loads(b.policy)


# --- the answer -----------------------------------------------------------------------------------


def denied(start_response, service, environ, message):
    code = "UnauthorizedOperation" if service == "ec2" else "AccessDeniedException" if (
        environ.get("HTTP_X_AMZ_TARGET") or service in ("scheduler", "lambda")) else "AccessDenied"
    return error_answer(start_response, service, environ, 403, code, message)


def error_answer(start_response, service, environ, status, code, message):
    """An AWS error answer in the protocol of `service`."""
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target or service in ("scheduler", "lambda"):
        body = json.dumps({"__type": code, "message": message, "Message": message})
        headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", code)]
    elif service == "s3":
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        headers = [("Content-Type", "application/xml")]
    elif service == "ec2":
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></Errors><RequestID>kiln-rehearsal</RequestID></Response>"
        )
        headers = [("Content-Type", "text/xml")]
    else:
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></ErrorResponse>"
        )
        headers = [("Content-Type", "text/xml")]
    data = body.encode()
    start_response(f"{status} Error", headers + [("Content-Length", str(len(data)))])
    return [data]


APPLIED = {}
APPLIED_LOCK = threading.Lock()


def fault_for(role_name, operation, region):
    path = os.environ.get("KILN_FAULTS")
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        faults = json.load(f)
    for fault in faults:
        if (
            fault.get("role", "") in role_name
            and fault.get("operation") == operation
            and fault.get("region", region) == region
        ):
            if "count" in fault:
                key = json.dumps(fault, sort_keys=True)
                with APPLIED_LOCK:
                    if APPLIED.get(key, 0) >= fault["count"]:
                        continue
                    APPLIED[key] = APPLIED.get(key, 0) + 1
            return fault
    return None


def failed_command(app, environ, start_response):
    """Runs GetCommandInvocation and reports the command Failed."""
    captured = {}

    def keep(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, headers

    body = b"".join(ORIGINAL_CALL(app, environ, keep))
    try:
        answer = json.loads(body)
    except ValueError:
        start_response(captured["status"], captured["headers"])
        return [body]
    answer.update(
        {
            "Status": "Failed",
            "StatusDetails": "Failed",
            "ResponseCode": 1,
            "StandardErrorContent": "kiln rehearsal: injected failure",
        }
    )
    data = json.dumps(answer).encode()
    headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
    start_response(captured["status"], headers + [("Content-Length", str(len(data)))])
    return [data]


def images_in_state(app, environ, start_response, state):
    """Runs DescribeImages and reports every image it lists as `state`."""
    captured = {}

    def keep(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, headers

    body = b"".join(ORIGINAL_CALL(app, environ, keep))
    data = re.sub(rb"<imageState>[a-z]+</imageState>", f"<imageState>{state}</imageState>".encode(), body)
    headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
    start_response(captured["status"], headers + [("Content-Length", str(len(data)))])
    return [data]


ORIGINAL_CALL = DomainDispatcherApplication.__call__


def task_answer(environ, start_response, body):
    """SendTaskSuccess, authorized: the rehearsal's executions run in kiln's engine, not moto's
    Step Functions, so the answer is appended to $KILN_TASK_ANSWERS (one JSON line) for the test
    to hand to its engine, and answered as Step Functions answers it."""
    with ANSWERS_LOCK, open(os.environ["KILN_TASK_ANSWERS"], "a", encoding="utf-8") as f:
        f.write(body.decode("utf-8") + "\n")
    data = b"{}"
    start_response("200 OK", [("Content-Type", "application/x-amz-json-1.0"), ("Content-Length", str(len(data)))])
    return [data]


ANSWERS_LOCK = threading.Lock()


# moto applies a DynamoDB write's condition and the write itself without holding a lock, so two
# requests on the server's threads can both pass `attribute_not_exists(pk)` (seen: two builds
# took one pipeline's lock). DynamoDB applies a conditional write atomically per item; here every
# DynamoDB request runs alone, which is at least as strict.
DYNAMODB_LOCK = threading.Lock()


def moto_call(self, environ, start_response, service):
    if service == "dynamodb":
        with DYNAMODB_LOCK:
            return ORIGINAL_CALL(self, environ, start_response)
    return ORIGINAL_CALL(self, environ, start_response)


def authorized_call(self, environ, start_response):
    # aws:SecureTransport is the scheme the request arrived by: the functions reach this server
    # through its TLS listener (as every AWS endpoint is TLS), the test's administrator over plain
    # HTTP on loopback, whose requests no policy evaluates.
    secure = environ.get("wsgi.url_scheme") == "https"
    length = int(environ.get("CONTENT_LENGTH") or 0)
    # A chunked upload has no Content-Length: werkzeug dechunks it (wsgi.input_terminated).
    body = environ["wsgi.input"].read(length) if length else (
        environ["wsgi.input"].read() if environ.get("wsgi.input_terminated") else b"")
    environ["wsgi.input"] = io.BytesIO(body)
    if environ.get("PATH_INFO", "").startswith(delivery.INJECT_PREFIX):
        return delivery.handle(environ, start_response, body)  # the test harness's own path
    query = {k: v[0] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()}
    key, region, service = signer(environ, query)
    if key is None and environ.get("PATH_INFO", "").startswith(identity.NOT_AWS):
        return moto_call(self, environ, start_response, service)
    # Who signed, as AWS decides it before any policy: the administrator's key, or an assumed
    # role's key with its own session token; anything else is refused with the service's code.
    role = assumed_role(key) if key and key not in identity.ADMIN else None
    if key is None:
        service = unsigned_service(self, environ)
        why, who = "unsigned", "anonymous"
    elif key in identity.ADMIN:
        why, who = None, "administrator"
    else:
        why = identity.credential_problem(role, environ, query)
        who = role_policies(role.role_arn)[0] if role else f"unknown key {key}"
    operation = environ.get("HTTP_X_AMZ_TARGET") or f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
    if why is not None:
        status, code, message = identity.answer(why, service, environ)
        record({"role": who, "service": service, "result": "CredentialsRefused", "code": code, "why": why,
                "operation": operation})
        return error_answer(start_response, service, environ, status, code, message)
    secret = identity.ADMIN[key] if role is None else role.secret_access_key
    problem = signature_problem(environ, body, query, service, secret)
    if problem is not None:
        status, code, _ = identity.answer("signature", service, environ)
        if problem == "Request has expired":
            status, code = 403, "AccessDenied"
        record({"role": who, "service": service, "result": "SignatureRefused", "code": code, "why": problem,
                "operation": operation})
        return error_answer(start_response, service, environ, status, code, problem)
    if role is None:
        # The account's administrator: verified, then run unevaluated.
        return moto_call(self, environ, start_response, service)
    function, policies = role_policies(role.role_arn)
    principal = f"arn:{PARTITION}:sts::{ACCOUNT}:assumed-role/{function}/{role.session_name}"
    asks = map_request(service, region, environ, body, query)
    if service == "ec2":
        params = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        operation = (params.get("Action") or [operation])[0]
    if asks is None:
        record({"role": function, "service": service, "operation": operation, "result": "Unmapped"})
        return denied(start_response, service, environ, f"kiln rehearsal: {service} {operation} is not mapped to IAM")
    for action, resource, context in asks:
        ctx = {
            "aws:RequestedRegion": region,
            "aws:PrincipalArn": role.role_arn,
            "aws:PrincipalAccount": ACCOUNT,
            "aws:SecureTransport": "true" if secure else "false",
        }
        ctx.update(context)
        decision = EVALUATOR.decide(
            {
                "principal": principal,
                "action": action,
                "resource": resource,
                "accountId": ACCOUNT,
                "context": ctx,
                "identityPolicies": policies,
                "resourcePolicy": bucket_policy(resource),
            }
        )
        entry = {
            "role": function,
            "service": service,
            "operation": operation,
            "action": action,
            "resource": resource,
            "context": context,
            "result": decision["result"],
        }
        if decision.get("why"):
            entry["why"] = decision["why"]
        record(entry)
        if decision["result"] != "Allowed":
            return denied(
                start_response,
                service,
                environ,
                f"User: {principal} is not authorized to perform: {action} on resource: {resource} ({decision['result']})",
            )
    if operation.endswith(".SendTaskSuccess") and os.environ.get("KILN_TASK_ANSWERS"):
        return task_answer(environ, start_response, body)
    if service == "lambda":
        # Only DryRun: the bootstraps run through the test's Runtime API emulator, not moto.
        if environ.get("HTTP_X_AMZ_INVOCATION_TYPE") != "DryRun":
            return error_answer(start_response, service, environ, 400, "InvalidParameterValueException",
                                "kiln rehearsal: only DryRun invocations are answered here")
        return dry_run(environ, start_response, asks[0][1])
    fault = fault_for(function, operation, region)
    if fault is not None:
        record({"role": function, "operation": operation, "region": region, "fault": fault})
        if "error" in fault:
            e = fault["error"]
            return error_answer(start_response, service, environ, e.get("status", 400), e["code"], e.get("message", "injected"))
        if fault.get("commandStatus") == "Failed":
            return failed_command(self, environ, start_response)
        if "imageState" in fault:
            return images_in_state(self, environ, start_response, fault["imageState"])
    return moto_call(self, environ, start_response, service)


DomainDispatcherApplication.__call__ = authorized_call
delivery.install()


def _bucket_policy_left_to_the_evaluator(self, action, resource):
    # moto's own bucket-policy check ignores Condition blocks, so the stack's TLS-only Deny
    # (Condition aws:SecureTransport false) would deny every request. Here bucket policies are
    # evaluated, conditions included, by iam-simulate as the resource policy of each S3 request.
    from moto.iam.access_control import PermissionResult

    return PermissionResult.NEUTRAL


FakeBucket.get_permission = _bucket_policy_left_to_the_evaluator

def certificate(folder):
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem in `folder`): the functions
    trust it through SSL_CERT_FILE, as they trust the Lambda runtime's CA bundle in AWS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln rehearsal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(paths[1] + ".tmp", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.rename(paths[1] + ".tmp", paths[1])
    with open(paths[0] + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # The certificate appears last: the harness waits for it (and the port) before it starts a function.
    os.rename(paths[0] + ".tmp", paths[0])
    return paths


def serve_tls(host, port, folder):
    """The functions' endpoint: the same moto (backends are process-wide) behind TLS, with
    keep-alive as AWS endpoints answer."""
    from moto.server import create_backend_app
    from werkzeug.serving import WSGIRequestHandler, run_simple

    class KeepAlive(WSGIRequestHandler):
        protocol_version = "HTTP/1.1"

    cert, key = certificate(folder)
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=True, ssl_context=(cert, key), request_handler=KeepAlive)


if __name__ == "__main__":
    EVALUATOR = moto_gaps.evaluator()
    from moto.server import main

    if os.environ.get("KILN_TLS_PORT"):
        host = sys.argv[sys.argv.index("-H") + 1] if "-H" in sys.argv else "127.0.0.1"
        threading.Thread(
            target=serve_tls, args=(host, int(os.environ["KILN_TLS_PORT"]), os.environ["KILN_TLS_DIR"]), daemon=True
        ).start()
    main()
