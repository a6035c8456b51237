"""Toys for tests/test_loggers.py: models with tied weights, a language-model dataset, a hook that
breaks a logger's store mid-run."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainguard.engine.events import Hook


class LmRows(Dataset):
    """Token rows for next-token prediction: ``input_ids`` and ``labels`` (the same list, as Hugging
    Face's causal LMs take them)."""

    def __init__(self, n: int = 128, length: int = 8, vocab: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = self.ids[i].tolist()
        return {"input_ids": row, "labels": row}


class TiedLM(nn.Module):
    """An embedding, a norm and an output head that shares the embedding's weight (one tensor under
    ``embed.weight`` and ``head.weight``, as transformers ties them)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, labels=None):
        logits = self.head(self.norm(self.embed(input_ids)))[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def tiny_gpt2(vocab: int = 32, dim: int = 16):
    """transformers' GPT-2 from a tiny config (``lm_head.weight`` tied to ``transformer.wte.weight``)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config(vocab, dim))


def gpt2_config(vocab: int = 32, dim: int = 16):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=dim, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)


class BreakStore(Hook):
    """At step ``at``, replaces the directory ``path`` (a logger's local store) with a file: the
    logger's next write fails for real."""

    def __init__(self, path: str, at: int = 3):
        self.path, self.at = Path(path), at

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.at:
            shutil.rmtree(self.path)
            self.path.write_text("not a store any more")
