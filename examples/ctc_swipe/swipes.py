"""Swipe-typing traces for a CTC recogniser (field report 001), generated: no download.

Each item is one word swiped over a QWERTY layout: per frame 8 motion features (x, y, dx, dy,
vx, vy, ax, ay) and a one-hot of the nearest of 27 keys (35 features), padded to `max_frames`,
with the true lengths beside them. A fraction `too_short` of the traces are cut shorter than
their word: CTC cannot align them and gives an infinite loss, as real truncated recordings do.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm'"]
KEYS = {c: (col + 0.5 * r, float(r)) for r, row in enumerate(ROWS) for col, c in enumerate(row)}
LETTERS = "abcdefghijklmnopqrstuvwxyz'"
N_KEYS, N_FEATURES = len(LETTERS), 8 + len(LETTERS)


class SwipeTraces(Dataset):
    def __init__(self, n: int = 2000, max_frames: int = 64, too_short: float = 0.02, seed: int = 0, words: int = 300):
        g = torch.Generator().manual_seed(seed)
        vocab = ["".join(LETTERS[int(i)] for i in torch.randint(0, 26, (int(k),), generator=g))
                 for k in torch.randint(2, 7, (words,), generator=g)]
        self.max_frames, self.items = max_frames, []
        for _ in range(n):
            word = vocab[int(torch.randint(0, words, (1,), generator=g))]
            frames = int(torch.randint(len(word) * 4, min(max_frames, len(word) * 8) + 1, (1,), generator=g))
            if float(torch.rand(1, generator=g)) < too_short:
                frames = max(1, len(word) // 2)  # a truncated recording: shorter than its label
            self.items.append((word, frames, int(torch.randint(0, 2**31 - 1, (1,), generator=g))))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        word, frames, seed = self.items[i]
        g = torch.Generator().manual_seed(seed)
        points = torch.tensor([KEYS[c] for c in word])
        t = torch.linspace(0, len(word) - 1, frames)
        lo = t.floor().long().clamp(max=len(word) - 1)
        hi = (lo + 1).clamp(max=len(word) - 1)
        xy = points[lo] + (points[hi] - points[lo]) * (t - lo).unsqueeze(1) + 0.1 * torch.randn(frames, 2, generator=g)
        d = torch.diff(xy, dim=0, prepend=xy[:1])
        v = torch.diff(d, dim=0, prepend=d[:1])
        a = torch.diff(v, dim=0, prepend=v[:1])
        keys = torch.tensor(list(KEYS.values()))
        nearest = torch.cdist(xy, keys).argmin(1)
        onehot = torch.nn.functional.one_hot(nearest, N_KEYS).float()
        features = torch.zeros(self.max_frames, N_FEATURES)
        features[:frames] = torch.cat([xy, d, v, a, onehot], 1)
        return {"features": features, "feature_len": frames,
                "targets": [LETTERS.index(c) + 1 for c in word] + [0] * (8 - len(word)),  # 0: CTC blank / padding
                "target_len": len(word), "word_id": i}
