"""What `--topology` names: Cloud TPU accelerator types, JAX topology strings, or cpu:N.

The dry run compiles for devices that need not exist. A Cloud TPU accelerator type, written
as `gcloud ... --accelerator-type` writes it (v4-8, v5litepod-16, v5p-128, v6e-8; `2xv4-32`
for two slices), becomes the slice's chip grid, host layout and core mode, which
`jax.experimental.topologies.get_topology_desc` turns into compile-only devices through
libtpu (the `tpu` extra). Megacore generations (v4, v5p) count two TensorCores per chip in
their name and compile as one device per chip, as jax.make_mesh requires for them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax


class TopologyError(ValueError):
    """A --topology this host cannot turn into devices; the message says what would."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as gcloud names it and as libtpu describes it."""

    gcloud: str            # accelerator-type prefix: v4, v5litepod, v5p, v6e
    jax: str               # get_topology_desc's topology-name prefix
    cores_per_chip: int    # what the number in the accelerator type counts per chip
    megacore: bool         # two TensorCores compiled as one device
    hbm_gib: float         # HBM per chip
    dims: int              # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_counts: tuple[int, ...]


GENERATIONS = (
    Generation("v4", "v4", 2, True, 32.0, 3, tuple(2 ** k for k in range(2, 13))),
    Generation("v5p", "v5p", 2, True, 95.0, 3, tuple(2 ** k for k in range(2, 14))),
    Generation("v5litepod", "v5e", 1, False, 16.0, 2, (1, 4, 8, 16, 32, 64, 128, 256)),
    Generation("v6e", "v6e", 1, False, 32.0, 2, (1, 4, 8, 16, 32, 64, 128, 256)),
)
BY_PREFIX = {g.gcloud: g for g in GENERATIONS}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A resolved accelerator type: what get_topology_desc needs, and the chip's HBM."""

    name: str
    generation: Generation
    chips: int
    grid: tuple[int, ...]              # chips along each torus axis
    chips_per_host: tuple[int, int, int]
    num_slices: int = 1

    @property
    def hosts(self) -> int:
        per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
        return max(1, self.chips // per_host) * self.num_slices

    def topology_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"chips_per_host_bounds": self.chips_per_host,
                              "num_slices": self.num_slices}
        if self.generation.megacore:
            kw["chip_config_name"] = "megacore"
        return kw

    @property
    def topology_name(self) -> str:
        return f"{self.generation.jax}:{'x'.join(map(str, self.grid))}"


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shapes Cloud TPU documents: 4 chips 2x2x1 (3-D) or 2x2 (2-D), then the
    smallest axis doubles (the last of equals first): 2x2x2, 2x2x4, 2x4x4, 4x4x4; 2x4, 4x4, 4x8."""
    grid = [1] * dims
    if dims == 3 and chips >= 4:
        grid = [2, 2, 1]
    while grid[0] * grid[1] * (grid[2] if dims == 3 else 1) < chips:
        smallest = min(grid)
        i = max(j for j, v in enumerate(grid) if v == smallest)
        grid[i] *= 2
    return tuple(grid)


def known_types() -> str:
    """Every accelerator type this module resolves, one brace group per generation."""
    return "; ".join(f"{g.gcloud}-{{{','.join(str(c * g.cores_per_chip) for c in g.chip_counts)}}}"
                     for g in GENERATIONS)


def parse_accelerator_type(text: str) -> Slice:
    """'v4-8' -> 4 megacore chips on 2x2x1; '2xv5litepod-16' -> two 4x4 slices."""
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5litepod|v6e)-(\d+)", text.strip())
    if not m:
        raise TopologyError(
            f"--topology {text!r}: not a Cloud TPU accelerator type, tpu:NAME[,k=v] or cpu:N. "
            f"Known accelerator types (as gcloud --accelerator-type writes them; prefix Mx "
            f"for M slices): {known_types()}")
    slices, prefix, n = int(m.group(1) or 1), m.group(2), int(m.group(3))
    gen = BY_PREFIX[prefix]
    chips, rem = divmod(n, gen.cores_per_chip)
    if rem or chips not in gen.chip_counts or slices < 1:
        valid = ", ".join(f"{prefix}-{c * gen.cores_per_chip}" for c in gen.chip_counts)
        raise TopologyError(f"--topology {text!r}: {prefix} slices come as {valid}")
    grid = chip_grid(chips, gen.dims)
    if gen.dims == 3 or chips >= 16:
        per_host = (2, 2, 1)  # 4 chips per host
    else:  # single-host v5e / v6e machines of 1, 4 or 8 chips
        per_host = (grid[0], grid[1], 1)
    return Slice(text.strip(), gen, chips, grid, per_host, slices)


def hbm_bytes(devices: list[jax.Device]) -> float | None:
    """HBM per device for a TPU generation in GENERATIONS (megacore: per chip), else None."""
    kind = devices[0].device_kind.lower() if devices else ""
    table = {"tpu v4": "v4", "tpu v5 lite": "v5litepod", "tpu v5e": "v5litepod",
             "tpu v5p": "v5p", "tpu v5": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}
    prefix = table.get(kind)
    return None if prefix is None else BY_PREFIX[prefix].hbm_gib * 2 ** 30


def _value(text: str) -> Any:
    """'2x2x1' -> (2, 2, 1); '4' -> 4; anything else stays text."""
    if all(p.isdigit() for p in text.split("x")):
        parts = tuple(int(p) for p in text.split("x"))
        return parts if len(parts) > 1 else parts[0]
    return text


def _describe(name: str, platform: str, kwargs: dict[str, Any], shown: str) -> list[jax.Device]:
    from jax.experimental import topologies

    # Compile-only devices never touch a chip, so libtpu's one-process-per-host lock would
    # only make two dry runs (or a test and its subprocess) on one host refuse each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(name, platform, **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        hint = ("TPU topologies need libtpu: pip install -e \".[tpu]\" (the `tpu` extra "
                "brings the libtpu matching the installed jax)" if not libtpu_available()
                else "check the topology name and its keys (see kronjax/topology.py)")
        raise TopologyError(f"--topology {shown}: JAX cannot describe this topology here "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). {hint}") from e


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str | None) -> list[jax.Device]:
    """Devices to compile for: this host's (None, or cpu:N once the CLI set the count), a
    Cloud TPU accelerator type, or PLATFORM:NAME[,key=value...] passed to get_topology_desc
    as is (e.g. tpu:v5e:2x2, whose AxBxC values become int tuples)."""
    if not topology or topology.startswith("cpu:"):
        devices = jax.devices()
        if topology and len(devices) != int(topology[4:]):
            raise TopologyError(f"--topology {topology}: JAX already has {len(devices)} "
                                "devices; set it before anything initialises JAX (use the CLI)")
        return devices
    if ":" not in topology:
        s = parse_accelerator_type(topology)
        if not libtpu_available():
            raise TopologyError(f"--topology {topology}: compiling for TPUs needs libtpu: "
                                "pip install -e \".[tpu]\"")
        return _describe(s.topology_name, "tpu", s.topology_kwargs(), topology)
    platform, _, rest = topology.partition(":")
    name, *pairs = rest.split(",")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise TopologyError(f"--topology {topology}: expected key=value after the name, "
                                f"got {pair!r}")
        kwargs[key] = _value(value)
    return _describe(name, platform, kwargs, topology)
