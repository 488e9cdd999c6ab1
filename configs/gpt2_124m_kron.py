"""The paper's method at 124M: gpt2_124m.py with the Kronecker input side (arm kron).

Run:     python -m kronjax.train --config configs/gpt2_124m_kron.py --workdir runs/124m_kron
Differs from configs/gpt2_124m.py only in model.arm = "kron" (codec pos_dim 16, D = 4096,
a 4096 x 768 projection instead of a 50304 x 768 table, and a separate output head).
Expect:  validation loss 2.5 +- 0.2% below the bpe_tied baseline over 3 seeds (the paper).
"""

import ml_collections

from kronjax.config import REPO_CONFIGS, load_config_file


def get_config() -> ml_collections.ConfigDict:
    cfg = load_config_file(REPO_CONFIGS / "gpt2_124m.py")
    cfg.model.arm = "kron"
    return cfg
