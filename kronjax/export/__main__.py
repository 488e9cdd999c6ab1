"""`python -m kronjax.export`: see kronjax.export."""

import sys

from kronjax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
