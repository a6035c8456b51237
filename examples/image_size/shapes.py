"""Images of coloured shapes (square, disc, triangle) drawn with torch: an image classification
task with no download. `size` is the side in pixels, the value field report 004 got wrong."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

CLASSES = ("square", "disc", "triangle")


class Shapes(Dataset):
    def __init__(self, n: int = 3000, size: int = 224, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(0, len(CLASSES), (1,), generator=g))
        s = self.size
        r = float(torch.empty(1).uniform_(0.15, 0.3, generator=g)) * s
        cx, cy = (float(v) * (s - 2 * r) + r for v in torch.rand(2, generator=g))
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
        if label == 0:
            mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r)
        elif label == 1:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        else:
            mask = (yy - cy < r) & (yy - cy > -r) & ((xx - cx).abs() < (yy - cy + r) / 2)
        image = 0.1 * torch.randn(3, s, s, generator=g)
        image[:, mask] += torch.rand(3, 1, generator=g) + 0.5
        return {"image": image, "label": label}
