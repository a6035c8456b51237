"""Blurry video clips of moving squares, and their sharp frames: a video deblurring task with no
download. Each clip is a scene (square positions, velocities, colours) stored as one JSON line in
`<root>/<split>/scenes.jsonl` and rendered to frames when read, as a decoder would. The folders are
made on first use for the split names this dataset knows (`train`, `val`); any other split name
finds no files, which is field report 002's empty RAM cache ("Loading 0 blur, 0 sharp")."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

SPLITS = {"train": 0, "val": 1}  # split -> the seed its scenes are drawn with


def make_split(folder: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"squares": [{"x": rng.random(), "y": rng.random(), "vx": rng.uniform(-.06, .06),
                                      "vy": rng.uniform(-.06, .06), "side": rng.uniform(.1, .25),
                                      "rgb": [rng.random() for _ in range(3)]} for _ in range(rng.randint(1, 3))]})
             for _ in range(n)]
    tmp = folder / "scenes.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(folder / "scenes.jsonl")


class BlurryClips(Dataset):
    """`frames` sharp frames of `size` x `size` pixels per clip; the blurry input is each frame
    averaged with its neighbours in time (motion blur). Items: {"blurry", "sharp"}, each a
    (channels, frames, height, width) tensor: the 5-D batches Conv3d takes."""

    def __init__(self, root: str = "data/video_deblur", split: str = "train", n: int = 2000,
                 frames: int = 5, size: int = 64):
        folder = Path(root) / split
        if split in SPLITS and not (folder / "scenes.jsonl").exists():
            make_split(folder, n, SPLITS[split])
        self.scenes = [json.loads(line) for path in sorted(folder.glob("*.jsonl"))
                       for line in path.read_text().splitlines()][:n]
        self.frames, self.size = frames, size

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        s, t = self.size, self.frames
        yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
        sharp = torch.zeros(3, t + 2, s, s)
        for sq in self.scenes[i]["squares"]:
            for f in range(t + 2):
                x, y = (sq["x"] + sq["vx"] * 3 * f) % 1, (sq["y"] + sq["vy"] * 3 * f) % 1
                mask = ((xx - x).abs() < sq["side"] / 2) & ((yy - y).abs() < sq["side"] / 2)
                sharp[:, f, mask] = torch.tensor(sq["rgb"]).unsqueeze(1)
        blurry = (sharp[:, :-2] + sharp[:, 1:-1] + sharp[:, 2:]) / 3
        return {"blurry": blurry, "sharp": sharp[:, 1:-1]}
