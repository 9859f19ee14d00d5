"""moto's server with the one SSM action kiln needs that moto 5 lacks: DescribeInstanceInformation.

Every instance moto's EC2 reports running in the region answers as a managed instance with its
agent Online (moto runs no SSM agent; it also reports every command as Success). Filters on
InstanceIds are honoured. Everything else is moto, unchanged. Used by the `kiln run --backend aws`
end-to-end test; run as `python moto_server_ssm_inventory.py -H 127.0.0.1 -p PORT`.
"""

import json

from moto.ec2.models import ec2_backends
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

if __name__ == "__main__":
    from moto.server import main

    main()
