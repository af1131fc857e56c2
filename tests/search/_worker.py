"""A search worker for the multi-worker tests: ``python -m tests.search._worker '<json>'``.

The JSON gives run_search's arguments; ``slow`` (seconds) sleeps at every loss read-back so that a
trial lasts long enough to be killed in the middle.
"""

import json
import sys
import time


def main():
    args = json.loads(sys.argv[1])
    slow = args.pop("slow", 0)
    from search import loop, train

    if slow:
        real = train.run

        def run(*a, callback=None, **kw):
            def pause(info):
                time.sleep(slow)
                if callback is not None:
                    callback(info)

            return real(*a, callback=pause, **kw)

        loop.train.run = run
    r = loop.run_search(args.pop("study"), estimate=False, **args)
    print(json.dumps({"spent": r.spent, "rows": len(r.rows())}))


if __name__ == "__main__":
    main()
