"""The rehearsal's report: requests evaluated per scenario, denies, and the actions each function's
role is granted but that no scenario used.

Reads the decision logs the rehearsal tests keep (target/tmp/rehearsal/*.jsonl, or DIR) and the
expanded template. Every granted-but-unused action left in the template should say why there.
Usage: report.py EXPANDED.json [DIR]
"""

import collections
import glob
import json
import os
import sys


def main(expanded, folder="target/tmp/rehearsal"):
    used = collections.defaultdict(set)
    print("requests evaluated per scenario (denied):")
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        n = denied = 0
        for line in open(path, encoding="utf-8"):
            d = json.loads(line)
            if "action" not in d:
                continue
            n += 1
            denied += d["result"] != "Allowed"
            used[d["role"].split("-")[1]].add(d["action"])
        print(f"  {os.path.basename(path).rsplit('-', 1)[0]}: {n} ({denied})")
    template = json.load(open(expanded, encoding="utf-8"))
    total = 0
    print("granted but unused:")
    for name, r in template["Resources"].items():
        if r["Type"] != "AWS::IAM::Role" or not name.endswith("FunctionRole"):
            continue
        granted = set()
        for p in r["Properties"].get("Policies", []):
            for s in p["PolicyDocument"]["Statement"]:
                a = s["Action"]
                granted.update([a] if isinstance(a, str) else a)
        unused = sorted(granted - used[name])
        total += len(unused)
        print(f"  {name}: {', '.join(unused) or '-'}")
    print(f"  total: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
