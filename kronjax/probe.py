"""`python -m kronjax.probe ...`: the README's name for `python -m kronjax.probes ...`."""

import sys

from kronjax.probes.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
