"""`python -m kronjax.data ...`: see kronjax.data.cli."""

from kronjax.data.cli import main

main()
