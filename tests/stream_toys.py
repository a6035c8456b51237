"""Streams for tests/test_stream.py, importable as `_target_: tests.stream_toys:...`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.toys import Blobs, MLP


class BlobCursor(torch.utils.data.IterableDataset):
    """Blobs as a stream with torchdata's Stateful protocol (its position). Every 50th item is None and
    every 61st raises (the stream goes on: an iterator object, not a generator). Each iteration's
    start (process, worker, position) is appended to ``log``: a resume that replays starts at 0."""

    def __init__(self, n: int = 256, log: str | None = None):
        self.blobs, self.log, self.pos, self._from = Blobs(n=n), log, 0, 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self._from = state["pos"]

    def __iter__(self):
        self.pos, self._from = self._from, 0  # a loaded state is for the next iteration only
        if self.log:
            info = torch.utils.data.get_worker_info()
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {info.id if info else -1} {self.pos}\n")
        return self

    def __next__(self):
        i = self.pos
        if i >= len(self.blobs):
            raise StopIteration
        self.pos += 1
        if i % 61 == 60:
            raise ValueError(f"item {i} is corrupt")
        return None if i % 50 == 49 else self.blobs[i]


class PlainCursor(BlobCursor):
    """The same stream without the Stateful protocol: resumed by replay."""

    state_dict = None
    load_state_dict = None


def hf_stream(n: int = 192, shards: int = 4):
    """Blobs as a Hugging Face `datasets` stream (`to_iterable_dataset`), in ``shards`` shards."""
    import datasets

    b = Blobs(n=n)
    return datasets.Dataset.from_dict({"x": b.x.tolist(), "label": b.labels.tolist(), "idx": list(range(n))}
                                      ).to_iterable_dataset(num_shards=shards)


class RecordingMLP(MLP):
    """An MLP that appends the `idx` of every sample it trains on to ``<out>/rank<RANK>.txt``."""

    def __init__(self, out: str, **kw):
        super().__init__(**kw)
        self.out = Path(out)

    def forward(self, x, label=None, idx=None):
        if idx is not None and self.training and torch.is_grad_enabled():
            with open(self.out / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write("".join(f"{int(i)}\n" for i in idx))
        return super().forward(x, label)


class WorkerSplit(torch.utils.data.IterableDataset):
    """A stream that splits itself over loader workers (torch's documented pattern): worker `w` of `n`
    yields items `w, w + n, ...` (`data.stream_split: dataset`)."""

    def __init__(self, n: int = 64):
        self.blobs = Blobs(n=n)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        return (self.blobs[i] for i in range(w, len(self.blobs), nw))
