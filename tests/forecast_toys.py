"""Toys for the memory forecast on model code fake tensors cannot run (tests/test_forecast_robust.py).

Each reproduces what a real model does: a CTC head that checks its labels' values and selects the
unpadded ones (``Wav2Vec2ForCTC``), a mixture-of-experts router that gathers each expert's tokens
with ``nonzero`` (the eager experts loop of Mixtral-style models), the grouped matmul of MoE
experts (``F.grouped_mm``, whose shape-only kernel takes bf16 only), and a layer-size mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from tests.toys import classified


class Frames(Dataset):
    """Speech-like items: ``x`` (T, dim) float frames and ``labels`` (S,) token ids, -100 padded."""

    def __init__(self, n: int = 64, frames: int = 32, dim: int = 16, vocab: int = 12, targets: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, frames, dim, generator=g)
        self.labels = torch.randint(1, vocab, (n, targets), generator=g)
        lengths = torch.randint(targets // 2, targets + 1, (n,), generator=g)
        self.labels[torch.arange(targets)[None, :] >= lengths[:, None]] = -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.labels[i]}


class CTCHead(nn.Module):
    """An encoder and a CTC head that reads its labels' values, as ``Wav2Vec2ForCTC.forward`` does."""

    def __init__(self, dim: int = 16, hidden: int = 64, vocab: int = 12):
        super().__init__()
        self.vocab = vocab
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.enc(x))
        out = {"logits": logits}
        if labels is None:
            return out
        if labels.max() >= self.vocab:  # a Python branch on a value: fake tensors have none
            raise ValueError(f"label values must be < vocab_size: {self.vocab}")
        mask = labels >= 0
        targets = labels.masked_select(mask)  # its length is the number of real labels: data-dependent
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        out["loss"] = F.ctc_loss(log_probs, targets, lengths, mask.sum(-1), blank=0, zero_infinity=True)
        return out


class RoutedMoE(nn.Module):
    """A classifier whose hidden layer is a top-2 mixture of experts; each expert's tokens are
    found with ``torch.where`` (``nonzero``: an output shaped by the router's choices)."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.router = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
                                     for _ in range(experts))
        self.top_k = top_k
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        h = self.inp(x)
        weights, chosen = torch.topk(self.router(h).softmax(-1), self.top_k, dim=-1)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            mixed = mixed.index_add(0, rows, (expert(h[rows]) * weights[rows, slot, None]).to(h.dtype))
        return classified(self.out(mixed), label)


class GroupedMoE(nn.Module):
    """Experts as one (experts, in, out) weight, applied with ``F.grouped_mm`` to the tokens sorted
    by expert (as transformers' ``grouped_mm`` experts do); the offsets come from ``histc``, so
    every shape is static, but the fake kernel of ``grouped_mm`` accepts only bf16 inputs."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32, experts: int = 4):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.router = nn.Linear(hidden, experts)
        self.w = nn.Parameter(torch.randn(experts, hidden, 2 * hidden) / hidden ** 0.5)
        self.out = nn.Linear(2 * hidden, classes)
        self.experts = experts

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        h = self.inp(x)
        chosen = self.router(h).argmax(-1)
        order = chosen.argsort()
        counts = torch.histc(chosen.float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        y = F.grouped_mm(h[order].to(self.w.dtype), self.w, offs=offs)
        y = torch.empty_like(y).index_copy(0, order, y)
        return classified(self.out(F.gelu(y)), label)


class Mismatch(nn.Module):
    """Two layers whose sizes disagree (16 out, 12 in): the forward fails on any input."""

    def __init__(self, dim: int = 8, classes: int = 4):
        super().__init__()
        self.a = nn.Linear(dim, 16)
        self.b = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        return classified(self.b(self.a(x)), label)
