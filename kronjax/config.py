"""Configs: files with `--config.a.b=value` overrides, the checks a run needs, their record.

  - loading: a config file's get_config() (ml_collections), overrides keeping each field's
    type; an unknown key is an error naming the nearest valid keys (a typo in a long sweep
    must not silently train the default);
  - checking: settings a run cannot use (a count < 1, a batch grad_accum does not divide),
    refused once, here, before anything is prepared or compiled;
  - recording: config.json and config_history.jsonl in the workdir, and which settings a
    resume changed.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from kronjax import logfiles
from kronjax.errors import UserError

log = logging.getLogger("kronjax.config")

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = REPO_CONFIGS / "default.py"


class ConfigError(UserError):
    """A config file or override that cannot be applied."""


def load_module(path: str | Path) -> ModuleType:
    """Import a config file as a module (get_config, and optionally get_variants)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the shipped ones are in "
                          f"{REPO_CONFIGS}: {sorted(p.name for p in REPO_CONFIGS.glob('*.py'))}")
    spec = importlib.util.spec_from_file_location(f"kronjax_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Import a config file and call its get_config(); a run's recorded config.json (a
    .json file) is read as it is, so a run another tool wrote (kronjax.retokenize) trains on."""
    if str(path).endswith(".json"):
        return _json_config(Path(path))
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _json_config(path: Path) -> ml_collections.ConfigDict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a run's config.json)")
    return ml_collections.ConfigDict(data)


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, name + "."))
        else:
            keys.append(name)
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Sections whose keys a config lists only where it changes a default table, so an override
# may add a key there (kronjax.mesh checks the name: a logical axis).
OPEN_SECTIONS = ("mesh.rules",)


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set cfg[key] (dotted) from a command-line string, keeping the field's type."""
    valid = flat_keys(cfg)
    section, _, name = key.rpartition(".")
    if key not in valid and section in OPEN_SECTIONS and "." not in name and \
            _lookup(cfg, section) is not None:
        _lookup(cfg, section)[name] = text
        return
    if key not in valid:
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint} (valid keys: see the config file)")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    old = node[leaf]
    value = _parse_value(text)
    if isinstance(old, str) and not isinstance(value, str):
        value = text
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and isinstance(old, bool) != isinstance(value, bool):
        raise ConfigError(f"config key {key!r} is a {type(old).__name__}; got {text!r}")
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config key {key!r} expects {type(old).__name__}; got {text!r}") from e


def parse_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    overrides, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"{arg} needs a value ({arg}=VALUE or {arg} VALUE)")
                key, value = body, args[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def build_config(path: str | Path | None, overrides: Sequence[tuple[str, str]]
                 ) -> ml_collections.ConfigDict:
    cfg = load_config_file(path or DEFAULT_CONFIG)
    for key, value in overrides:
        apply_override(cfg, key, value)
    return cfg


# Settings a run divides by or counts with: (key, what it means), each an integer >= 1.
POSITIVE_INTS = (("train.steps", "optimizer steps"),
                 ("train.batch_size", "sequences per optimizer step"),
                 ("train.grad_accum", "micro-batches per step"),
                 ("train.eval_every", "steps between evaluations"),
                 ("train.checkpoint_every", "steps between checkpoints"),
                 ("train.log_every", "steps between log lines"),
                 ("train.keep_checkpoints", "checkpoints kept"),
                 ("data.eval_batches", "validation batches"))


def check_run_config(cfg: ml_collections.ConfigDict) -> None:
    """Refuse settings a run cannot use before anything is prepared or compiled (batch_size=0
    was a ZeroDivisionError, eval_every=0 one after compiling). Keys a config lacks are skipped."""
    for key, meaning in POSITIVE_INTS:
        section, leaf = key.split(".")
        if leaf not in cfg.get(section, {}):
            continue
        value = cfg[section][leaf]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1 ({meaning}); got {value!r}")
    b, a = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    if b % a:
        raise ConfigError(f"train.batch_size {b} is not divisible by train.grad_accum {a}")


def section(cfg: ml_collections.ConfigDict, name: str) -> Any:
    """A config section, or an empty dict for configs written before it existed."""
    return cfg.get(name) or {}


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def _lookup(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} where two configs differ, compared as JSON (the form both are
    stored in); a key on one side only has None on the other."""
    a, b = (ml_collections.ConfigDict(json.loads(json.dumps(d, default=str))) for d in (old, new))
    keys = sorted(set(flat_keys(a)) | set(flat_keys(b)))
    return {k: (_lookup(a, k), _lookup(b, k)) for k in keys if _lookup(a, k) != _lookup(b, k)}


def read_saved_config(path: Any) -> dict[str, Any]:
    """A run's saved config.json as a dict; a damaged one is a ConfigError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); kronjax.train writes it when a run "
                          "starts: rerun the training command to rewrite it, or restore it "
                          "from a copy") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds {type(data).__name__}, not a config object; rerun "
                          "the training command to rewrite it")
    return data


def record_config(config_json: Any, history: Any, cfg: ml_collections.ConfigDict,
                  step: int) -> None:
    """Write cfg as config_json (what the run uses now) and append it to the history (JSONL,
    one line per start whose config differs from the previous line's), so a resume with a
    changed learning rate or seed never erases what trained the earlier steps. A config.json
    written before the history existed is kept as its first line (step null: unknown)."""
    current = json.loads(to_json(cfg))
    last: Any = None
    if history.exists():  # a damaged line is skipped with a warning: it never blocks a resume
        records = [r for r in logfiles.read_records(history.read_bytes(), str(history))
                   if isinstance(r.get("config"), dict)]
        last = records[-1]["config"] if records else None
    elif config_json.exists():
        try:
            last = json.loads(config_json.read_bytes())
        except ValueError as e:  # rewritten below: the history keeps what it can
            log.warning("%s is not valid JSON (%s): it is rewritten with this run's config",
                        config_json, e)
            last = None
        if last is not None and last != current:
            _append(history, {"step": None, "time": None, "config": last})
    if last != current:
        _append(history, {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "changed": {k: list(v) for k, v in
                                      changed_settings(last or {}, current).items()}
                          if last is not None else {}, "config": current})
    config_json.write_text(to_json(cfg))


def _append(path: Any, record: Mapping[str, Any]) -> None:
    """One more JSON line; a bucket has no append, so there the object is rewritten whole."""
    line = json.dumps(record, sort_keys=True) + "\n"
    if isinstance(path, Path):
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            line = "\n" + line  # a line cut short stays alone on its line, skipped by readers
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    else:
        old = path.read_bytes() if path.exists() else b""
        sep = b"\n" if old and not old.endswith(b"\n") else b""
        path.write_bytes(old + sep + line.encode("utf-8"))
