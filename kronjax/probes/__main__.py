"""`python -m kronjax.probes` is an alias of `python -m kronjax.probe`."""

import sys

from kronjax.probe import main

sys.exit(main())
