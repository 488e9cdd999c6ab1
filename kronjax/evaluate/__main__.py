import sys

from kronjax.evaluate.cli import main

sys.exit(main())
