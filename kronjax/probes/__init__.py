"""Probes of trained runs: typo robustness, generation with novel words, embedding geometry.

Run them with `python -m kronjax.probes {robustness,generation,geometry} ...`; each module's
`run(...)` is the same probe as a function returning its tables and records.
"""

from kronjax.probes import common, generation, geometry, robustness

__all__ = ["common", "generation", "geometry", "robustness"]
