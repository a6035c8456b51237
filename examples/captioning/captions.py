"""Captioned images (field report 003) with a real word-level tokenizer built from the captions.

The images are drawn with torch: one or two coloured shapes on a grid; the caption says what
and where ("a red square above a blue disc"). :class:`WordTokenizer` is built from the training
captions (words by frequency, ``min_freq``), with <pad>, <bos>, <eos> and <unk>; it encodes,
decodes, and saves to / loads from JSON, so the model and its vocabulary travel together.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "disc", "bar")
RELATIONS = {"above": (0, -1), "below": (0, 1), "left of": (-1, 0), "right of": (1, 0)}


class WordTokenizer:
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: list[str]):
        self.itos = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: list[str], min_freq: int = 1, max_size: int = 8000) -> "WordTokenizer":
        counts = Counter(w for c in captions for w in c.lower().split())
        return cls([w for w, n in counts.most_common(max_size) if n >= min_freq])

    def encode(self, caption: str, length: int) -> list[int]:
        ids = [1] + [self.stoi.get(w, 3) for w in caption.lower().split()][:length - 2] + [2]
        return ids + [0] * (length - len(ids))

    def decode(self, ids) -> str:
        words = []
        for i in (int(x) for x in ids):
            if i == 2:
                break
            if i > 3 or i == 3:
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.itos))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls(json.loads(Path(path).read_text())[len(cls.SPECIALS):])

    def __len__(self) -> int:
        return len(self.itos)


def _scene(g: torch.Generator) -> tuple[list, str]:
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=g))]  # noqa: E731
    a = (pick(list(COLOURS)), pick(SHAPES))
    if float(torch.rand(1, generator=g)) < 0.3:
        return [(a, (1, 1))], f"a {a[0]} {a[1]}"
    b = (pick(list(COLOURS)), pick(SHAPES))
    rel = pick(list(RELATIONS))
    dx, dy = RELATIONS[rel]
    return [(a, (1 + dx, 1 + dy)), (b, (1 - dx, 1 - dy))][:2], f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}"


def _captions(n: int, seed: int) -> list[tuple[list, str]]:
    g = torch.Generator().manual_seed(seed)
    return [_scene(g) for _ in range(n)]


class ShapeCaptions(Dataset):
    """``image`` (3 x size x size) and ``caption`` token ids; the tokenizer is built from the captions
    of the training split (``vocab_seed``/``vocab_n``: the same vocabulary for val)."""

    def __init__(self, n: int = 3000, size: int = 48, seed: int = 0, max_len: int = 12, vocab_n: int = 3000, vocab_seed: int = 0):
        self.scenes, self.size, self.max_len = _captions(n, seed), size, max_len
        self.tokenizer = WordTokenizer.build([c for _, c in _captions(vocab_n, vocab_seed)])

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        objects, caption = self.scenes[i]
        s, cell = self.size, self.size // 3
        image = torch.zeros(3, s, s)
        for (colour, shape), (gx, gy) in objects:
            x0, y0 = gx * cell, gy * cell
            patch = torch.zeros(cell, cell, dtype=torch.bool)
            yy, xx = torch.meshgrid(torch.arange(cell), torch.arange(cell), indexing="ij")
            c = (cell - 1) / 2
            if shape == "square":
                patch = ((xx - c).abs() < cell / 3) & ((yy - c).abs() < cell / 3)
            elif shape == "disc":
                patch = (xx - c) ** 2 + (yy - c) ** 2 < (cell / 3) ** 2
            else:
                patch = ((xx - c).abs() < cell / 2.2) & ((yy - c).abs() < cell / 8)
            image[:, y0:y0 + cell, x0:x0 + cell][:, patch] = torch.tensor(COLOURS[colour]).unsqueeze(1)
        return {"image": image, "caption": self.tokenizer.encode(caption, self.max_len), "text": caption}
