"""colab/quickstart.ipynb runs end to end on CPU with a few steps (nbclient, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kronjax

NOTEBOOK = Path(__file__).resolve().parent.parent / "colab" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    assert "%pip install" in "".join(c.source for c in nb.cells)
    out, data = tmp_path / "runs", tmp_path / "data"
    params[0].source = (f"STEPS = 6\nCONFIG = 'tiny'\nARMS = 'bpe_tied,kron'\nOUT = {str(out)!r}\n"
                        f"DATA_DIR = {str(data)!r}\nREPO_URL = 'unused: kronjax is importable'")
    # the kernel imports this checkout's kronjax, whatever else is installed
    root = str(Path(kronjax.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "git clone" not in text and "kronjax 0." in text  # the install cell was skipped
    assert "byte_override" in text and "Typo robustness" in text and "typo@k" in text
    for name in ("summary.md", "loss_curves.png", "norm_drift.png", "bpe_tied_s0/metrics.jsonl",
                 "kron_s0/metrics.jsonl", "probes/robustness.json", "probes/geometry.json",
                 "probes/generation.jsonl"):
        assert (out / name).is_file(), name
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
