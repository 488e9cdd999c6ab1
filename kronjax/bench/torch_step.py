"""nanoGPT's train step in eager PyTorch, the reference the step benchmark compares against."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kronjax.bench.timing import StepArm, cpu_cores


def torch_step_arms(mcfg: Any, vocab: Any, cfg: Any, inputs_BxT: np.ndarray,
                    targets_BxT: np.ndarray, threads: int | None = None) -> list[StepArm]:
    """nanoGPT's model and step in PyTorch (eager, float32) at the same shape, two ways:
    the tied nn.Embedding table, and the authors' KroneckerEmbedding (its default "dynamic"
    mode) with a separate head. AdamW (decay on matrices), clip, as nanoGPT's train.py."""
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError as e:
        print(f"[bench] torch not importable ({e}); skipping the PyTorch arms", file=sys.stderr)
        return []
    try:
        from kronecker_embeddings import KroneckerEmbedding
    except ImportError:
        KroneckerEmbedding = None
    torch.set_num_threads(threads or cpu_cores())
    torch.manual_seed(0)
    d, h, n_layer, v = mcfg.n_embd, mcfg.n_head, mcfg.n_layer, mcfg.vocab_size
    bias = bool(mcfg.bias)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
            self.c_fc = nn.Linear(d, 4 * d, bias=bias)
            self.mlp_proj = nn.Linear(4 * d, d, bias=bias)
            self.gelu = nn.GELU()

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            q, k, val = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, val = (a.view(b, t, h, d // h).transpose(1, 2) for a in (q, k, val))
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
            return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class TorchGPT(nn.Module):
        def __init__(self, kron: bool) -> None:
            super().__init__()
            self.wte = (KroneckerEmbedding(
                v, d, pos_dim=vocab.pos_dim, byte_buffer=torch.from_numpy(np.array(vocab.rows)),
                length_buffer=torch.from_numpy(np.array(vocab.lengths))) if kron
                else nn.Embedding(v, d))
            self.wpe = nn.Embedding(mcfg.block_size, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d, bias=bias)
            self.lm_head = nn.Linear(d, v, bias=False)
            if not kron:
                self.wte.weight = self.lm_head.weight  # nanoGPT's weight tying

        def forward(self, idx: Any, targets: Any) -> Any:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, v), targets.view(-1))

    o = cfg.optim
    idx = torch.from_numpy(inputs_BxT.astype(np.int64))
    tgt = torch.from_numpy(targets_BxT.astype(np.int64))
    arms = []
    for name, kron in (("torch bpe_tied", False), ("torch kron (ref)", True)):
        if kron and (KroneckerEmbedding is None or vocab is None):
            print("[bench] kronecker_embeddings not importable; skipping its PyTorch arm",
                  file=sys.stderr)
            continue
        model = TorchGPT(kron)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2],
                   "weight_decay": float(o.weight_decay)},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=float(o.peak_lr), betas=(float(o.b1), float(o.b2)))
        arm = StepArm(name, lambda: None, tokens=int(inputs_BxT.size), slow=False,
                      note=f"torch {torch.__version__} eager fp32, "
                           f"{torch.get_num_threads()} threads")

        def step(model=model, opt=opt, arm=arm) -> None:
            loss = model(idx, tgt)
            loss.backward()
            if float(o.grad_clip) > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            arm.loss = float(loss.detach())

        arm.step = step
        arms.append(arm)
    return arms
