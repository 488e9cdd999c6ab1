"""Reads a task's JSONL next to this file into a `datasets.DatasetDict` ({"test": ...}).

lm-eval imports this file by path (`custom_dataset: !function loader.load` in the YAMLs),
so the shipped tasks need neither the Hugging Face hub nor a path relative to the working
directory: `lm_eval --include_path kronjax/evaluate/tasks ...` works from anywhere.
"""

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(file: str, **_: Any) -> Any:
    """`file`: the JSONL's name in this directory (the YAML's dataset_kwargs); lm-eval also
    passes the task's metadata (version, ...), which is ignored."""
    import datasets

    rows = [json.loads(line) for line in (HERE / file).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
