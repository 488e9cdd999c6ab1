"""Meshes, logical-axis rules, sharded train steps and the vocabulary-parallel cross-entropy.

The multi-device checks run this file as a script in a subprocess with 8 simulated CPU
devices (XLA_FLAGS must be set before JAX starts; this pytest process already has 1 device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kronjax import cluster
from kronjax import mesh as sharding
from kronjax import run as run_lib
from kronjax.loss import cross_entropy
from kronjax.vocab import synthetic_vocab

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.py"
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
# Arms per mesh beyond kron (which runs on all): both kinds of head, and the tied codec head.
EXTRA_ARMS = {(2, 2, 2): ("bpe_tied", "kron_tied")}


def _env(n_devices: int) -> dict[str, str]:
    """The test run's XLA flags (tests/conftest.py: cheap compiles, patient collectives) and
    n_devices simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


# -- in this process (1 device) ------------------------------------------------------------
def test_mesh_shape_fills_and_refuses() -> None:
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": 4, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="has 4 devices but there are 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()


def test_rules_override_and_errors() -> None:
    rules = dict(sharding.make_rules({"codec": "", "embed": "fsdp,tensor"}))
    assert rules["codec"] is None and rules["embed"] == ("fsdp", "tensor")
    assert rules["vocab"] == "tensor" and rules["batch"] == ("data", "fsdp")
    assert [n for n, _ in sharding.make_rules()] == [n for n, _ in sharding.DEFAULT_RULES]
    with pytest.raises(ValueError, match="unknown logical axis names \\['vocabulary'\\]"):
        sharding.make_rules({"vocabulary": "tensor"})
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.make_rules({"vocab": "model"})


def test_config_rules_match_the_default_table() -> None:
    from kronjax import config as config_lib

    cfg = config_lib.build_config(TINY, [])
    assert sharding.rules_from_config(cfg) == sharding.DEFAULT_RULES
    cfg = config_lib.build_config(TINY, [("mesh.rules.codec", "")])
    assert dict(sharding.rules_from_config(cfg))["codec"] is None


def test_detect_cluster_from_environment() -> None:
    assert cluster.detect_cluster({}) is None
    assert cluster.detect_cluster({cluster.ENV_COORDINATOR: "127.0.0.1:1234"}) == "env"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
    assert cluster.detect_cluster(slurm) == "slurm"
    assert cluster.detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: local
    assert cluster.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"
    assert cluster.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert cluster.initialize_distributed("off") is False
    assert cluster.initialize_distributed("auto") is False  # nothing detected here
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        cluster.initialize_distributed("yes")


def test_cpu_collective_scheduler_flag_is_added_once_and_a_user_choice_kept() -> None:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert cluster.safe_cpu_collectives(env) is True
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                        f"{cluster.CPU_SCHEDULER_FLAG}=false"]
    assert cluster.safe_cpu_collectives(env) is False and env["XLA_FLAGS"].count("sched") == 1
    mine = {"XLA_FLAGS": f"{cluster.CPU_SCHEDULER_FLAG}=true"}
    assert cluster.safe_cpu_collectives(mine) is False
    assert mine["XLA_FLAGS"] == f"{cluster.CPU_SCHEDULER_FLAG}=true"
    empty: dict[str, str] = {}
    assert cluster.safe_cpu_collectives(empty) and empty["XLA_FLAGS"] == (
        f"{cluster.CPU_SCHEDULER_FLAG}=false")


def test_fit_spec_keeps_what_divides() -> None:
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
    spec = P(("data", "fsdp"), "tensor")
    assert sharding.fit_spec(spec, (8, 4), mesh) == spec
    assert sharding.fit_spec(spec, (6, 3), mesh) == P("data", None)  # 6 % 4, 3 % 2
    assert sharding.fit_spec(P("fsdp"), (4, 4), mesh) == P("fsdp", None)  # padded to ndim
    one = AbstractMesh((4, 1, 1), sharding.MESH_AXES)
    assert sharding.fit_spec(spec, (8, 4), one) == P("data", None)  # size-1 axes dropped


# -- 8 simulated devices, in a subprocess ----------------------------------------------------
def _worker() -> dict[str, Any]:
    """Run one step per (mesh, arm) and report losses, params and shardings as JSON."""
    import optax

    from kronjax import config as config_lib
    from kronjax import optim
    from kronjax import step as step_mod
    from kronjax.model import GPT

    assert jax.device_count() == 8, jax.devices()
    vocab_n = 500  # padded to 512 by vocab_multiple 64
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_n, (8, 33)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    out: dict[str, Any] = {"runs": {}, "specs": {}, "ce": {}}
    inits: dict[tuple[str, str], Any] = {}  # one init per (arm, optimizer), placed per mesh

    def run(shape: tuple[int, int, int], arm: str, grad_accum: int = 1, vp: str = "auto",
            opt: str = "sgd") -> dict[str, Any]:
        d, f, t = shape
        cfg = config_lib.build_config(TINY, [  # one block: every block is sharded alike
            ("model.arm", arm), ("model.n_layer", "1"), ("mesh.data", str(d)),
            ("mesh.fsdp", str(f)),
            ("mesh.tensor", str(t)), ("train.grad_accum", str(grad_accum)),
            ("mesh.vocab_parallel_ce", vp)])
        mcfg = run_lib.model_config(cfg, vocab_n)
        vocab = (synthetic_vocab(vocab_n, mcfg.pos_dim).pad_to(mcfg.vocab_size)
                 if mcfg.is_kron else None)
        model = GPT(mcfg, vocab)
        if opt == "sgd":  # the update is the gradient itself: a sharp comparison
            schedule = optax.constant_schedule(0.5)
            tx = optax.sgd(schedule)
        else:
            tx, schedule = optim.from_config(cfg)
        devices = jax.devices()[:d * f * t]
        plan = run_lib.make_plan(cfg, model, tx, devices)
        if (arm, opt) not in inits:  # init is sharding-invariant (partitionable threefry)
            inits[arm, opt] = jax.device_get(jax.jit(
                lambda: step_mod.init_state(model, tx, 0, mcfg.block_size))())
        state = jax.device_put(inits[arm, opt], plan.state_sh)
        step = plan.step_fn(model, tx, schedule)
        key = jax.device_put(jax.random.key(1), sharding.replicated(plan.mesh))
        gb = sharding.global_batch(step_mod.split_micro(batch, grad_accum), plan.micro_sh,
                                   plan.micro_shape)
        state, m1 = step(state, gb, key)
        state, m2 = step(state, gb, key)  # donated state: the second step reuses buffers
        params = jax.device_get(state["params"])
        flat = {sharding._path_str(p): np.asarray(v).ravel()[:64].tolist()
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        specs = {sharding._path_str(p): str(v.sharding.spec)
                 for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
        opt_specs = {sharding._path_str(p): str(v.sharding.spec)
                     for p, v in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
        return {"loss": [float(m1["loss"]), float(m2["loss"])],
                "grad_norm": float(m1["grad_norm"]), "params": flat, "specs": specs,
                "opt_specs": opt_specs, "batch_spec": str(plan.micro_sh.spec),
                "vocab_parallel": run_lib.use_vocab_parallel_ce(cfg, plan.mesh),
                "param_keys": sorted(params)}

    for arm in ("kron", "bpe_tied", "kron_tied"):
        out["runs"][f"1x1x1/{arm}"] = run((1, 1, 1), arm)
    for shape in MESHES:
        name = "x".join(map(str, shape))
        for arm in ("kron",) + EXTRA_ARMS.get(shape, ()):
            out["runs"][f"{name}/{arm}"] = run(shape, arm)
    out["runs"]["1x4x2/kron/plain_ce"] = run((1, 4, 2), "kron", vp="False")
    out["runs"]["2x2x2/kron/accum2"] = run((2, 2, 2), "kron", grad_accum=2)
    adam = run((1, 4, 2), "kron", opt="adamw")
    out["runs"]["1x4x2/kron/adamw"] = {k: adam[k] for k in ("specs", "opt_specs", "loss")}

    # The shard_map cross-entropy against the plain one, value and gradient.
    for shape in ((1, 4, 2), (2, 1, 4), (1, 1, 8)):
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
        rules = sharding.make_rules()
        logits = jax.random.normal(jax.random.key(3), (8, 5, 512)) * 4
        targets = jax.random.randint(jax.random.key(4), (8, 5), 0, 512)
        vp = sharding.vocab_parallel_cross_entropy(mesh, rules)
        v1, g1 = jax.jit(jax.value_and_grad(vp))(logits, targets)
        v0, g0 = jax.jit(jax.value_and_grad(cross_entropy))(logits, targets)
        text = jax.jit(vp).lower(logits, targets).as_text()
        out["ce"]["x".join(map(str, shape))] = {
            "vp": float(v1), "plain": float(v0), "grad_err": float(np.abs(g1 - g0).max()),
            "shard_map": "shard_map" in text or "manual" in text.lower()}
    return out


@pytest.fixture(scope="module")
def eight() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "worker"], capture_output=True, text=True,
                          env=_env(8), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_meshes_match_one_device(eight: dict[str, Any], shape: tuple[int, int, int]) -> None:
    name = "x".join(map(str, shape))
    for arm in ("kron",) + EXTRA_ARMS.get(shape, ()):
        ref, got = eight["runs"][f"1x1x1/{arm}"], eight["runs"][f"{name}/{arm}"]
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-5, err_msg=f"{name}/{arm}")
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
        assert got["params"].keys() == ref["params"].keys()
        for k in ref["params"]:
            np.testing.assert_allclose(got["params"][k], ref["params"][k], rtol=1e-4, atol=2e-6,
                                       err_msg=f"{name}/{arm} {k}")
        assert got["vocab_parallel"] == (shape[2] > 1)


def test_grad_accumulation_and_plain_ce_on_a_mesh(eight: dict[str, Any]) -> None:
    """Two micro-batches on a mesh, and the constrained plain CE on a tensor mesh, equal one
    device's single batch (test_train checks accumulation == one big batch on 1 device)."""
    runs = eight["runs"]
    assert runs["1x4x2/kron/plain_ce"]["vocab_parallel"] is False
    for key in ("1x4x2/kron/plain_ce", "2x2x2/kron/accum2"):
        ref = runs["1x1x1/kron"]
        np.testing.assert_allclose(runs[key]["loss"], ref["loss"], rtol=2e-5, err_msg=key)
        for k in ref["params"]:
            np.testing.assert_allclose(runs[key]["params"][k], ref["params"][k], rtol=1e-4,
                                       atol=2e-6, err_msg=f"{key} {k}")
    assert runs["2x2x2/kron/accum2"]["batch_spec"] == str(P(None, ("data", "fsdp"), None))


def test_params_are_sharded_as_the_rules_say(eight: dict[str, Any]) -> None:
    runs = eight["runs"]
    kron = runs["2x2x2/kron"]["specs"]
    assert kron["kron/projection"] == str(P("fsdp", None))           # codec rows over fsdp
    assert kron["lm_head/kernel"] == str(P("fsdp", "tensor"))        # separate head: V on tensor
    assert kron["h_0/attn/c_attn/kernel"] == str(P("fsdp", None, "tensor", None))
    assert kron["h_0/attn/c_proj/kernel"] == str(P("tensor", None, "fsdp"))
    assert kron["h_0/mlp/c_fc/kernel"] == str(P("fsdp", "tensor"))
    assert kron["wpe/embedding"] == str(P(None, "fsdp"))
    assert kron["ln_f/scale"] == str(P(None))
    bpe = runs["2x2x2/bpe_tied"]["specs"]
    assert bpe["wte/embedding"] == str(P("tensor", "fsdp"))          # tied head: V on tensor
    assert runs["1x8x1/kron"]["specs"]["kron/projection"] == str(P("fsdp", None))
    dp = runs["8x1x1/kron"]["specs"]
    assert set(dp.values()) <= {str(P(None)), str(P(None, None)), str(P(None, None, None)),
                                str(P(None, None, None, None))}    # pure data parallel
    assert runs["8x1x1/kron"]["batch_spec"] == str(P(None, "data", None))
    # The codec is no parameter: only W is on the input side, nothing V x P or V x C.
    assert runs["2x2x2/kron"]["param_keys"] == ["h_0", "kron", "lm_head", "ln_f", "wpe"]
    assert runs["2x2x2/kron_tied"]["param_keys"] == ["h_0", "kron", "ln_f", "wpe"]


def test_optimizer_state_follows_the_params(eight: dict[str, Any]) -> None:
    adam = eight["runs"]["1x4x2/kron/adamw"]
    mus = {k.split("/mu/", 1)[1]: v for k, v in adam["opt_specs"].items() if "/mu/" in k}
    nus = {k.split("/nu/", 1)[1]: v for k, v in adam["opt_specs"].items() if "/nu/" in k}
    assert mus and mus == nus
    for path, spec in mus.items():
        assert spec == adam["specs"][path], path
    assert mus["kron/projection"] == str(P("fsdp", None))
    counts = [v for k, v in adam["opt_specs"].items() if k.endswith("count")]
    assert counts and set(counts) == {str(P())}
    assert all(np.isfinite(adam["loss"]))


def test_vocab_parallel_cross_entropy_equals_plain(eight: dict[str, Any]) -> None:
    for name, r in eight["ce"].items():
        np.testing.assert_allclose(r["vp"], r["plain"], rtol=1e-6, err_msg=name)
        assert r["grad_err"] < 1e-7, name
        assert r["shard_map"], name


def test_dry_run_prints_memory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kronjax.train", "--config", str(TINY), "--dry_run",
         "--topology", "cpu:8", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
         f"--config.data.dir={tmp_path / 'none'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled step memory per device: argument" in proc.stdout
    assert "SYNTHETIC vocabulary of 512 ids" in proc.stdout  # no data: clearly labelled
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and report["devices"] == 8
    mem = report["memory_per_device"]
    assert mem["argument"] > 0 and mem["temp"] > 0
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert report["params"]["total"] > 0 and report["vocab_parallel_ce"] is True
    assert not (tmp_path / "none").exists()  # nothing prepared, nothing written


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print(json.dumps(_worker()))
