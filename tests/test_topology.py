"""topology: Cloud TPU accelerator types -> slices, and the devices libtpu describes for them."""

from __future__ import annotations

import pytest

from kronjax import topology

# Slice shapes as Cloud TPU's docs list them for each accelerator type (chips, chip grid, hosts).
DOCUMENTED = {
    "v4-8": (4, (2, 2, 1), 1), "v4-16": (8, (2, 2, 2), 2), "v4-32": (16, (2, 2, 4), 4),
    "v4-64": (32, (2, 4, 4), 8), "v4-128": (64, (4, 4, 4), 16), "v4-256": (128, (4, 4, 8), 32),
    "v5p-8": (4, (2, 2, 1), 1), "v5p-128": (64, (4, 4, 4), 16),
    "v5litepod-1": (1, (1, 1), 1), "v5litepod-4": (4, (2, 2), 1),
    "v5litepod-8": (8, (2, 4), 1), "v5litepod-16": (16, (4, 4), 4),
    "v5litepod-32": (32, (4, 8), 8), "v5litepod-256": (256, (16, 16), 64),
    "v6e-8": (8, (2, 4), 1), "v6e-16": (16, (4, 4), 4), "v6e-256": (256, (16, 16), 64),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_accelerator_types_resolve_to_the_documented_slices(name: str) -> None:
    chips, grid, hosts = DOCUMENTED[name]
    s = topology.parse_accelerator_type(name)
    assert (s.chips, s.grid, s.hosts) == (chips, grid, hosts)
    megacore = name.startswith(("v4", "v5p"))
    assert (s.topology_kwargs().get("chip_config_name") == "megacore") == megacore
    assert s.topology_name.split(":")[0] == {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e",
                                             "v6e": "v6e"}[name.rsplit("-", 1)[0]]


def test_multislice_prefix() -> None:
    s = topology.parse_accelerator_type("2xv4-32")
    assert (s.chips, s.num_slices, s.hosts) == (16, 2, 8)
    assert s.topology_kwargs()["num_slices"] == 2


@pytest.mark.parametrize("bad, says", [
    ("v7-8", "Known accelerator types"), ("v4-6", "v4 slices come as v4-8, v4-16"),
    ("v5litepod-2", "v5litepod-1, v5litepod-4"), ("v4-4", "v4-8"), ("tpu-v4-8", "v6e-{1,4"),
])
def test_unknown_types_list_the_known_ones(bad: str, says: str) -> None:
    with pytest.raises(topology.TopologyError, match=r"--topology") as e:
        topology.parse_accelerator_type(bad)
    assert says in str(e.value)


def test_without_libtpu_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(topology.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
        topology.topology_devices("v5litepod-8")


def test_cpu_and_raw_forms() -> None:
    import jax

    assert topology.topology_devices(None) == jax.devices()
    with pytest.raises(topology.TopologyError, match="already has"):
        topology.topology_devices(f"cpu:{len(jax.devices()) + 3}")
    with pytest.raises(topology.TopologyError, match="expected key=value"):
        topology.topology_devices("tpu:v5e:2x2,oops")


needs_libtpu = pytest.mark.skipif(not topology.libtpu_available(),
                                  reason="libtpu absent: pip install -e '.[tpu]'")


@needs_libtpu
@pytest.mark.parametrize("name, devices, kind, processes, hbm", [
    ("v4-8", 4, "TPU v4", 1, 32), ("v5p-8", 4, "TPU v5", 1, 95),
    ("v5litepod-16", 16, "TPU v5 lite", 4, 16), ("v6e-8", 8, "TPU v6 lite", 1, 32),
])
def test_libtpu_describes_one_device_per_chip(name: str, devices: int, kind: str,
                                              processes: int, hbm: int) -> None:
    d = topology.topology_devices(name)
    assert len(d) == devices and d[0].device_kind == kind
    assert len({x.process_index for x in d}) == processes
    assert topology.hbm_bytes(d) == hbm * 2 ** 30


@needs_libtpu
@pytest.mark.parametrize("name, mesh, devices, attention", [
    ("v4-8", {}, 4, "reference"),                # megacore: one device per chip; T = 32
    # 4 hosts, every mesh axis; T = 128 and K = 64 take the splash kernel under shard_map
    ("v5litepod-16", {"data": 2, "fsdp": 4, "tensor": 2}, 16, "splash"),
    ("v6e-8", {}, 8, "reference"),
])
def test_the_tiny_step_compiles_for_a_slice(name: str, mesh: dict[str, int], devices: int,
                                            attention: str) -> None:
    from kronjax import config as config_lib
    from kronjax import dryrun

    overrides = [(f"mesh.{k}", str(v)) for k, v in mesh.items()]
    if attention == "splash":
        overrides += [("model.block_size", "128"), ("model.n_embd", "128")]
    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "tiny.py", overrides)
    lines: list[str] = []
    rep = dryrun.dry_run(cfg, topology=name, out=lines.append)
    assert (rep["platform"], rep["devices"], rep["attention"]) == ("tpu", devices, attention)
    assert rep["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1} | mesh
    total = rep["memory_per_device"]["total"]
    assert 0 < total <= rep["hbm_per_device"] and rep["fits"]
    assert rep["cost"]["flops"] > 0 and rep["cost"]["bytes accessed"] > 0
    assert any(line.startswith("fits: ") for line in lines), lines


@needs_libtpu
@pytest.mark.slow  # one 124M compile: 1.5-2.5 minutes on 2 cores
def test_the_124m_kron_step_fits_a_v4_8() -> None:
    """The issue's own command: configs/gpt2_124m_kron.py fully sharded on a v4-8 (a
    synthetic GPT-2-size vocabulary offline), with the splash attention and the codec's
    one-hot matmuls; it fits the 32 GiB chip with room to spare."""
    from kronjax import config as config_lib
    from kronjax import dryrun

    cfg = config_lib.build_config(config_lib.REPO_CONFIGS / "gpt2_124m_kron.py",
                                  [("mesh.data", "1"), ("mesh.fsdp", "-1")])
    lines: list[str] = []
    rep = dryrun.dry_run(cfg, topology="v4-8", out=lines.append)
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and rep["attention"] == "splash"
    assert rep["micro_batch"] == [8, 64, 1024] and rep["params"]["input_side"] == 4096 * 768
    total = rep["memory_per_device"]["total"]
    assert rep["fits"] and 4 * 2**30 < total < 0.5 * rep["hbm_per_device"], total / 2**30
    assert any(line.startswith("fits: ") and "of 32.000 GiB" in line for line in lines)
