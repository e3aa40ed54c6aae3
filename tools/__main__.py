"""`python -m tools ...` is `tokenbus ...` (how `tokenbus up` starts its own children)."""

import sys

from tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
