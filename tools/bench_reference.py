"""`python -m tools.bench_reference`: tokenbus on the sim against two plain SSE servers, directly and behind
nginx, in one run (tools/bench/reference.py)."""

import sys

from tools.bench.reference import main

if __name__ == "__main__":
    sys.exit(main())
