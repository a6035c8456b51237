"""A character-level transformer trained on the Python standard library's own source text.

Every Python installation has this text, so the quickstart needs no download. Bytes above
127 are dropped, so the vocabulary is the 128 ASCII codes.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB = 128


_NON_ASCII = bytes(range(VOCAB, 256))


@functools.lru_cache(maxsize=4)  # train and val datasets read the same text
def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` ASCII bytes of the stdlib's top-level ``*.py`` files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        data = f.read_bytes().translate(None, _NON_ASCII)
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


class StdlibChars(Dataset):
    """Non-overlapping windows of ``block_size + 1`` characters: ``input_ids`` and next-char ``labels``.

    Items also carry ``idx`` (the window number), which the model's forward() does not take:
    trainguard passes a model only the fields its forward() accepts.
    """

    def __init__(self, split: str = "train", block_size: int = 128, max_bytes: int = 2_000_000, val_fraction: float = 0.05):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        text = torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8)
        cut = int(len(text) * (1 - val_fraction))
        self.text = text[:cut] if split == "train" else text[cut:]
        self.block = block_size
        self.n = (len(self.text) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        chunk = self.text[i * self.block: i * self.block + self.block + 1].long()
        return {"idx": i, "input_ids": chunk[:-1], "labels": chunk[1:]}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small GPT: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, vocab_size: int = VOCAB, block_size: int = 128, dim: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, dim), nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return out
