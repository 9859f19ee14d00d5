"""cfn-lint, with room for the state machine definition.

cfn-lint validates the definition CloudFormation receives (the Fn::Join of the expanded
template) recursively; the Parallel state that runs the test beside the copies nests deeper than
Python's default recursion limit (1000) lets it go, and it then reports E1022 "maximum recursion
depth exceeded" instead of checking. This runs the same cfn-lint, same rules, with a higher limit
on a thread with a stack big enough for it. Arguments are cfn-lint's.
"""

import sys
import threading

from cfnlint.runner import main


def run(result):
    try:
        main()
        result.append(0)
    except SystemExit as e:
        result.append(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))


if __name__ == "__main__":
    sys.argv[0] = "cfn-lint"
    sys.setrecursionlimit(20000)
    threading.stack_size(256 * 1024 * 1024)
    result = []
    t = threading.Thread(target=run, args=(result,))
    t.start()
    t.join()
    sys.exit(result[0] if result else 1)
