"""Tiny real models and datasets for the tests, importable as `_target_: tests.toys:...`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Gaussian blobs: a classification task a small MLP learns in a few dozen steps.

    Items are dicts with `x` (a list of floats), `label` (an int) and `idx` (which no model takes).
    """

    def __init__(self, n: int = 512, dim: int = 8, classes: int = 4, seed: int = 0, noise: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=g) * 2
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.x = centers[self.labels] + noise * torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i].tolist(), "label": int(self.labels[i]), "idx": i}


class MLP(nn.Module):
    """forward(x, label=None) -> {"logits", "loss"}; explicit arguments, no **kwargs."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        logits = self.body(x)
        out = {"logits": logits}
        if label is not None:
            out["loss"] = F.cross_entropy(logits, label)
        return out


# ---- hooks used by the engine tests -------------------------------------------------------

from trainguard.engine.events import Event, Hook  # noqa: E402


class Sleep(Hook):
    """Slows each step down so that a test can signal or kill the run mid-way."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_step_end(self, trainer) -> None:
        import time

        time.sleep(self.seconds)


class Recorder(Hook):
    """Appends every event it receives to a file, one name per line."""

    def __init__(self, path: str):
        self.path = path

    def _rec(self, event: Event):
        def handler(trainer):
            with open(self.path, "a") as f:
                f.write(f"{event.value} {trainer.state.step}\n")
        return handler

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return object.__getattribute__(self, "_rec")(Event(name[3:]))
        return object.__getattribute__(self, name)


class DropoutMLP(MLP):
    """The MLP with dropout, so that exact resume also needs the RNG state."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32):
        super().__init__(dim, classes, hidden, dropout=0.2)


class FailsAtStep(MLP):
    """Raises an ordinary bug (not a data problem) on its Nth forward call."""

    def __init__(self, at: int = 3, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def forward(self, x, label=None):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("a bug in the user's model")
        return super().forward(x, label)
