"""Toy models and datasets for tests/test_config_faults.py (`_target_: tests.config_toys:...`)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tests.toys import MLP, BlobPairs


class ZeroWidth(nn.Module):
    """A model of zero width (`nn.Linear(8, 0)`): it has parameters, with no element to train."""

    def __init__(self, dim: int = 8):
        super().__init__()
        with warnings.catch_warnings():  # torch: "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            self.proj = nn.Linear(dim, 0)

    def forward(self, x, label=None):
        return self.proj(x).sum() + 0.0 * x.sum()


class Frozen(MLP):
    """The MLP with every parameter frozen (requires_grad=False)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.requires_grad_(False)


class FrozenBackbone(MLP):
    """The MLP with its first layer frozen: a frozen backbone and a trainable head (healthy)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.body[0].requires_grad_(False)


class NoParams(nn.Module):
    """A model with no parameters at all: its loss is computed from the data alone."""

    def forward(self, x, label=None):
        return (x ** 2).mean()


class PairNet(nn.Module):
    """forward(x, w=None) -> logits, for `(x, y)` items and `(x, w, y)` items alike, with
    `loss: {_target_: tests.config_toys:cross_entropy}` (the adapter calls forward(*item[:-1]))."""

    def __init__(self, dim: int = 8, classes: int = 4):
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward(self, x, w=None):
        return self.head(x if w is None else x * w[:, None])


def cross_entropy():
    """The loss `loss(output, target)`."""
    return F.cross_entropy


class SomeTriples(BlobPairs):
    """`(x, y)` tensor pairs, except the ids in `triples` (all of them with `triples: all`), which are
    `(x, w, y)` 3-tuples."""

    def __init__(self, triples: tuple | str = (4, 9), **kw):
        super().__init__(**kw)
        self.triples = set(range(len(self.labels))) if triples == "all" else set(triples)

    def __getitem__(self, i: int):
        x, y = self.x[i], torch.tensor(int(self.labels[i]))
        return (x, torch.tensor(1.0), y) if i in self.triples else (x, y)
