"""Whether the optional PyTorch reference (torch + kronecker-embeddings) can be imported."""

from __future__ import annotations

import importlib.util

import pytest


def _importable(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(n) is not None for n in names)
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


HAS_TORCH_REF = _importable("torch", "kronecker_embeddings")
needs_torch = pytest.mark.skipif(not HAS_TORCH_REF, reason="needs torch and kronecker-embeddings")
