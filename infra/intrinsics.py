"""CloudFormation intrinsic functions, resolved with the caller's Ref and Fn::GetAtt.

Used by policies.py (representative ARNs, for linters) and by the rehearsal's deploy.py (the
deployed stack's physical ids): Ref, Fn::GetAtt, Fn::Sub (with or without its variable map),
Fn::Join, and Fn::If (its first branch).
"""

import re


def resolve(value, ref, getatt):
    """`value` with every intrinsic replaced: `ref(name)` for Ref and `${name}`, `getatt(name,
    attribute)` for Fn::GetAtt and `${name.attribute}`."""

    def go(v):
        if isinstance(v, list):
            return [go(x) for x in v]
        if not isinstance(v, dict):
            return v
        if list(v) == ["Ref"]:
            return ref(v["Ref"])
        if list(v) == ["Fn::GetAtt"]:
            a = v["Fn::GetAtt"]
            return getatt(*(a if isinstance(a, list) else a.split(".", 1)))
        if list(v) == ["Fn::Sub"]:
            text, extra = (v["Fn::Sub"], {}) if isinstance(v["Fn::Sub"], str) else v["Fn::Sub"]

            def one(m):
                key = m.group(1)
                if key in extra:
                    return str(go(extra[key]))
                if "." in key:
                    return str(getatt(*key.split(".", 1)))
                return str(ref(key))

            return re.sub(r"\$\{([^}!]+)\}", one, text)
        if list(v) == ["Fn::Join"]:
            sep, parts = v["Fn::Join"]
            return sep.join(str(go(p)) for p in parts)
        if list(v) == ["Fn::If"]:
            return go(v["Fn::If"][1])
        return {k: go(x) for k, x in v.items()}

    return go(value)
