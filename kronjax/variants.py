"""Named arm variants for `python -m kronjax.compare`: an arm plus config settings.

A comparison sometimes needs an arm trained with other settings than the table it is set
against: kron with the input-side parameters it saves spent on depth, say. A config file may
define, next to get_config(),

    def get_variants() -> dict[str, dict[str, Any]]:
        return {"kron_8l": {"model.arm": "kron", "model.n_layer": 8}}

and then `--arms bpe_untied,kron_8l` trains both into one --out, as <name>_s<seed>, with the
pairing and report of any two arms. A variant's settings are dotted config keys, the same as
`--config.model.n_layer=8`, so its single run is the config plus those flags (`train_flags`).
They are applied after the --config overrides (the variant's setting wins) and must name the
arm (model.arm); a variant cannot take an arm's name, so `kron` always means the plain arm.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from kronjax import config as config_lib
from kronjax.model import ARMS

Variants = Mapping[str, Mapping[str, Any]]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# What pairs runs: the same seed on the same data, order and schedule. A variant changing
# one of these would not be paired with the other arms, and the report assumes one schedule.
SHARED = ("seed", "data.", "train.steps", "train.eval_every", "train.batch_size",
          "model.block_size")


def load(path: str | Path) -> dict[str, dict[str, Any]]:
    """The config file's get_variants(), checked against its get_config(); {} without one."""
    module = config_lib.load_module(path)
    if not hasattr(module, "get_variants"):
        return {}
    raw = module.get_variants()
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise config_lib.ConfigError(f"{path}: get_variants() must return "
                                     "{name: {dotted config key: value}}")
    variants = {str(k): dict(v) for k, v in raw.items()}
    base = config_lib.load_config_file(path)
    for name, settings in variants.items():
        check(name, settings, base)
    return variants


def check(name: str, settings: Mapping[str, Any], base: ml_collections.ConfigDict) -> None:
    """Refuse a variant that is ambiguous or that the base config cannot take."""
    where = f"variant {name!r}"
    if name in ARMS or not NAME.fullmatch(name):
        raise config_lib.ConfigError(
            f"{where}: a variant needs a name of letters, digits, '_', '.', '-' that is not an "
            f"arm's ({', '.join(ARMS)})")
    if settings.get("model.arm") not in ARMS:
        raise config_lib.ConfigError(f"{where} must set model.arm to one of {', '.join(ARMS)}; "
                                     f"got {settings.get('model.arm')!r}")
    if shared := [k for k in settings if k == "seed" or k.startswith(SHARED)]:
        raise config_lib.ConfigError(
            f"{where} sets {', '.join(shared)}: every arm of a comparison shares the seed, "
            "data, steps, evaluation and batch shape (that is what pairs them)")
    for key, value in settings.items():
        if not isinstance(value, (bool, int, float, str)):
            raise config_lib.ConfigError(f"{where}: {key} must be a bool, int, float or str "
                                         f"(a value the command line can give); got {value!r}")
    apply(base, settings, where)


def apply(cfg: ml_collections.ConfigDict, settings: Mapping[str, Any],
          where: str = "variant") -> ml_collections.ConfigDict:
    """A copy of cfg with the dotted settings set; an unknown key or a wrong type is an error."""
    out = copy.deepcopy(cfg)
    valid = set(config_lib.flat_keys(out))
    for key, value in settings.items():
        if key not in valid:
            raise config_lib.ConfigError(f"{where}: unknown config key {key!r}")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        old = node[leaf]
        if old is not None and isinstance(old, bool) != isinstance(value, bool):
            raise config_lib.ConfigError(f"{where}: {key} is a {type(old).__name__}; "
                                         f"got {value!r}")
        try:
            node[leaf] = value
        except TypeError as e:
            raise config_lib.ConfigError(f"{where}: {key} expects {type(old).__name__}; "
                                         f"got {value!r}") from e
    return out


def parse_names(text: str, variants: Variants) -> list[str]:
    """'bpe_untied,kron_8l' -> the names, each an arm or a variant, distinct."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if bad := [a for a in names if a not in ARMS and a not in variants]:
        valid = ", ".join([*ARMS, *variants])
        raise ValueError(f"unknown arms {bad}; valid arms are {valid}"
                         + ("" if variants else " (a config file can add variants with "
                            "get_variants(); see kronjax/variants.py)"))
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--arms needs distinct arm names; got {text!r}")
    return names


def settings_of(name: str, variants: Variants) -> dict[str, Any]:
    """What a compared name sets: a variant's settings, or just model.arm for a plain arm."""
    return dict(variants[name]) if name in variants else {"model.arm": name}


def train_flags(settings: Mapping[str, Any]) -> str:
    """The `--config.k=v` flags that give a single `python -m kronjax.train` run these settings."""
    return " ".join(shlex.quote(f"--config.{k}={v}") for k, v in settings.items())
