"""Log-type JSONL files (metrics.jsonl, config_history.jsonl) read line by line, damage skipped.

These files are records of what happened, appended to over a run's life: a crash cuts a line
short, a copy or an editor can leave a stray byte. One damaged line must never block a
resume, a report or an export, so a line that is not UTF-8, not JSON or not a JSON object is
skipped, and one warning per file names the file and the line numbers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["read_records"]

log = logging.getLogger("kronjax.logfiles")


def read_records(data: bytes | str, source: str, *, warn: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL text, in order; damaged lines skipped (a warning names
    `source` and their 1-based line numbers, unless `warn` is False). A last line cut short
    by a crash is skipped the same way."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    out: list[dict[str, Any]] = []
    bad: list[str] = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"{n} (not UTF-8)")
            continue
        except json.JSONDecodeError:
            bad.append(f"{n} (not JSON)")
            continue
        if not isinstance(rec, dict):
            bad.append(f"{n} (not a JSON object)")
            continue
        out.append(rec)
    if bad and warn:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        log.warning("%s: damaged line%s %s%s skipped (the other records are used)", source,
                    "s" if len(bad) > 1 else "", ", ".join(bad[:5]), more)
    return out
