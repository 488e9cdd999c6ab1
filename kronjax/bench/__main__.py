"""python -m kronjax.bench"""

import sys

from kronjax.bench.cli import main

sys.exit(main())
