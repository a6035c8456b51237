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

    def __init__(self, n: int = 512, dim: int = 8, classes: int = 4, seed: int = 0, noise: float = 0.5, sample_seed: int | None = None):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=g) * 2   # the task: the same for train and val
        if sample_seed is not None:
            g = torch.Generator().manual_seed(1000 + sample_seed)  # other samples of the same task
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
        return classified(self.body(x), label)


def classified(logits: torch.Tensor, label: torch.Tensor | None) -> dict:
    """A classifier's output: the logits, and with labels the cross-entropy loss."""
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


class SleepAtStart(Hook):
    """Sleep at each step's start: slows a run down for a kill without reading any step's values
    (a hook at STEP_END would make every step's verdict be read at once)."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_step_start(self, trainer) -> None:
        import time

        time.sleep(self.seconds)


class BusyC(Hook):
    """Slows each step down inside one long C call (no Python bytecode runs, so signals that arrive
    meanwhile are all handled together when it returns), as a heavy backward does."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds

    def on_step_end(self, trainer) -> None:
        import time

        x = torch.randn(256, 256)
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            torch.linalg.matrix_power(x / 256, 4000)  # ~tens of ms in C per call


class StepCounter(Hook):
    """Counts the steps it saw from ``start``, in its checkpointed state; writes the count to ``path`` at the end."""

    def __init__(self, path: str, start: int = 0):
        self.path, self.count = path, start

    def on_step_end(self, trainer) -> None:
        self.count += 1

    def on_fit_end(self, trainer) -> None:
        with open(self.path, "w") as f:
            f.write(str(self.count))

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


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


# ---- faults for the guard tests (each injected for real into a real run) ---------------------


class TokenRows(Dataset):
    """Field report 000: rows of Python lists of ints plus an `idx` and a `sentence` the model does not take.

    `input_ids` and `attention_mask` are lists of ints (numpy ints for half the rows, as some
    tokenizers give), `labels` an int. The label is whether token 7 appears in the row.
    """

    def __init__(self, n: int = 256, length: int = 12, vocab: int = 32, seed: int = 0):
        import numpy as np

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.np = np

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = self.ids[i].tolist()
        if i % 2:
            row = [self.np.int64(t) for t in row]
        return {"idx": i, "sentence": f"row {i}", "input_ids": row, "attention_mask": [1] * len(row), "labels": int(7 in row)}


class BagOfTokens(nn.Module):
    """forward(input_ids, attention_mask, labels) with explicit arguments: `idx` would be a TypeError."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)   # needs torch.long indices
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        h = (self.embed(input_ids) * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        logits = self.head(h)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class Utterances(Dataset):
    """Field report 001: CTC with a few infeasible samples (target longer than the input): their loss is inf."""

    def __init__(self, n: int = 256, frames: int = 12, feat: int = 8, classes: int = 6, target_len: int = 4,
                 infeasible: tuple = (5, 77, 150), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(1, classes, (n, target_len), generator=g)
        self.features = torch.randn(n, frames, feat, generator=g) * 0.1
        for t in range(target_len):  # make the targets learnable from the features
            self.features[:, 3 * t: 3 * t + 3, :classes] += F.one_hot(self.targets[:, t], feat)[:, None, :classes] * 2.0
        self.frames, self.infeasible = frames, set(infeasible)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        in_len = 2 if i in self.infeasible else self.frames   # 2 frames cannot emit 4 labels: CTC loss = inf
        return {"features": self.features[i], "targets": self.targets[i], "input_lengths": in_len,
                "target_lengths": self.targets.shape[1]}


class CTCModel(nn.Module):
    def __init__(self, feat: int = 8, classes: int = 6, hidden: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, features, targets, input_lengths, target_lengths):
        log_probs = self.encoder(features).log_softmax(-1).transpose(0, 1)   # (T, N, C)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="mean")


class Flaky(Blobs):
    """Blobs where some samples raise and some return None (a corrupt file, a filter that returns None)."""

    def __init__(self, broken_every: int = 0, broken_fraction: float = 0.0, broken_ids: tuple = (), **kw):
        super().__init__(**kw)
        n = len(self.labels)
        if broken_ids:
            self.broken = set(broken_ids)
        elif broken_fraction:
            g = torch.Generator().manual_seed(123)
            self.broken = set(torch.randperm(n, generator=g)[: int(n * broken_fraction)].tolist())
        else:
            self.broken = set(range(3, n, broken_every)) if broken_every else set()

    def __getitem__(self, i: int):
        if i in self.broken:
            if i % 2:
                return None
            raise ValueError(f"cannot decode sample {i}: truncated file")
        return super().__getitem__(i)


class Ones(Dataset):
    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": [1.0]}


class Scale(nn.Module):
    def __init__(self, shape: tuple = ()):
        super().__init__()
        self.w = nn.Parameter(torch.ones(shape))  # FSDP2 shards no 0-d parameter: (1,) there

    def forward(self, x):
        return x * self.w


class Fp16Activation(nn.Module):
    """Passes activations through fp16, as an fp16 layer would: past 65504 they overflow and it emits NaN."""

    def forward(self, x):
        h = x.half().float()
        return h + (h - h)   # inf - inf = NaN


class Diverging(nn.Module):
    """0.5 * (w x)^2 trained with SGD at lr 2.5 diverges (w *= -1.5 per step) until `encoder.1` emits NaN.

    At a lower LR (after a rollback halves it) the same model converges: rollback can fix the cause.
    """

    def __init__(self, shape: tuple = ()):
        super().__init__()
        self.encoder = nn.Sequential(Scale(tuple(shape)), Fp16Activation())

    def forward(self, x):
        return 0.5 * (self.encoder(x) ** 2).mean()


class WrongWidth(nn.Module):
    """Field report 001: the model was built for 10 features, the data has 8."""

    def __init__(self, in_features: int = 10):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x, label):
        return F.cross_entropy(self.head(self.encoder(x)), label)


class LoudMLP(MLP):
    """The MLP with its loss multiplied by 1000: at the GradScaler's initial scale of 65536 the
    fp16 gradients overflow, so the scaler must back off for a few steps (not bad data)."""

    def forward(self, x, label=None):
        out = super().forward(x, label)
        out["loss"] = out["loss"] * 1000
        return out


class BlobStream(torch.utils.data.IterableDataset):
    """Blobs as an iterable dataset (a stream), with every 50th item None."""

    def __init__(self, n: int = 256):
        self.blobs = Blobs(n=n)

    def __iter__(self):
        for i in range(len(self.blobs)):
            yield None if i % 50 == 49 else self.blobs[i]


class BlobPairs(Blobs):
    """Blobs as `(inputs, target)` tuples: a tensor and an int."""

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i])


class SpikyBlobs(Blobs):
    """Blobs where a few samples are mirrored and scaled by 50: finite, confidently wrong, so their loss
    spikes far above the rest."""

    def __init__(self, spiky: tuple = (40, 140, 240), **kw):
        super().__init__(**kw)
        self.spiky = set(spiky)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i in self.spiky:
            item["x"] = [v * -50 for v in item["x"]]
        return item


class OddShapes(Blobs):
    """Report 004: one sample of another size (448 vs 224) in the middle of the data."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["x"] = torch.tensor(item["x"]) if i != 100 else torch.zeros(16)
        return item


class NoisyBlobs(Blobs):
    """Blobs with random augmentation (torch, numpy and python RNGs) in __getitem__."""

    def __getitem__(self, i: int) -> dict:
        import random

        import numpy as np

        item = super().__getitem__(i)
        noise = torch.randn(len(item["x"])) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        item["x"] = (torch.tensor(item["x"]) + noise).tolist()
        return item


class TinyImages(Dataset):
    """3x16x16 images of 4 classes (a bright quadrant per class), for the CNN memory tests."""

    def __init__(self, n: int = 128, size: int = 16):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.rand(n, 3, size, size, generator=g) * 0.2
        h = size // 2
        for i, c in enumerate(self.labels.tolist()):
            self.x[i, :, (c // 2) * h:(c // 2 + 1) * h, (c % 2) * h:(c % 2 + 1) * h] += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.labels[i])}


class SmallCNN(nn.Module):
    """conv-bn-relu x2, pool, linear: a ResNet-style stem in plain torch."""

    def __init__(self, width: int = 16, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, image, label=None):
        logits = self.body(image)
        return {"logits": logits, "loss": F.cross_entropy(logits, label)}


# ---- faults for the diagnose tests (issue 8) ---------------------------------------------------


class FloatTokens(TokenRows):
    """Token ids read back as floats (as pandas does with a NaN in the column): they cannot index an Embedding."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item["input_ids"] = [float(t) for t in item["input_ids"]]
        return item


class NanBlobs(Blobs):
    """Blobs where every `every`-th sample has a NaN feature (a failed normalisation upstream)."""

    def __init__(self, every: int = 5, **kw):
        super().__init__(**kw)
        self.every = every

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i % self.every == 0:
            item["x"][0] = float("nan")
        return item


class NeedsMask(MLP):
    """forward() requires a `mask` argument that the dataset does not provide."""

    def forward(self, x, mask, label=None):
        return super().forward(x * mask, label)


class WithUnused(MLP):
    """An MLP with a layer it never calls (no gradient: under DDP that needs find_unused_parameters)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spare = nn.Linear(4, 4)


@torch.library.custom_op("trainguard_tests::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    """A custom kernel registered without a fake (meta) implementation: eager runs, torch.compile cannot trace it."""
    return x * 2


_double.register_autograd(lambda ctx, grad: grad * 2)


class CustomOpMLP(MLP):
    """The MLP with a custom op that has no fake kernel: torch.compile fails on it, eager works."""

    def forward(self, x, label=None):
        return super().forward(_double(x), label)


class KwargsModel(nn.Module):
    """A Hugging Face-style forward(input_ids, attention_mask=None, labels=None, **kwargs) that refuses
    what it did not ask for (as an HF model passing **kwargs on to its layers would fail on `idx`)."""

    def __init__(self, vocab: int = 32, dim: int = 16):
        super().__init__()
        self.bag = BagOfTokens(vocab, dim)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected fields reached the model: {sorted(kwargs)}")
        return self.bag(input_ids, attention_mask, labels)


class NanFrom(nn.Module):
    """Identity until its `at`-th call, then NaN for every sample: a layer that breaks mid-run."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        return x * float("nan") if self.calls >= self.at else x


class BreaksAt(MLP):
    """The MLP whose `body.1` (after the first Linear) emits NaN from its `at`-th forward on."""

    def __init__(self, at: int = 21, **kw):
        super().__init__(**kw)
        self.body[1] = nn.Sequential(nn.ReLU(), NanFrom(at))


class MissingFiles(Blobs):
    """A dataset whose files are not where the config says."""

    def __init__(self, root: str = "/nonexistent/data", **kw):
        raise FileNotFoundError(f"no such directory: {root}")


class SlowBlobs(Blobs):
    """Blobs whose every item takes `delay` seconds to load (a slow disk, a heavy decode)."""

    def __init__(self, delay: float = 0.005, **kw):
        super().__init__(**kw)
        self.delay = delay

    def __getitem__(self, i: int) -> dict:
        import time

        time.sleep(self.delay)
        return super().__getitem__(i)


class LateNoise(Blobs):
    """Blobs that draw from the RNGs only for indices >= `from_index`: the fetcher must notice mid-epoch."""

    def __init__(self, from_index: int = 200, **kw):
        super().__init__(**kw)
        self.from_index = from_index

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i >= self.from_index:
            import random

            item["x"] = [v + random.random() * 0.01 + float(torch.rand(())) * 0.01 for v in item["x"]]
        return item


class ItemsAtOnce(Blobs):
    """Blobs with a `__getitems__` (as a Hugging Face dataset has): a batch's items in one call.
    `calls` counts those calls in this process."""

    calls = 0

    def __getitems__(self, indices: list[int]) -> list[dict]:
        ItemsAtOnce.calls += 1
        xs, labels = self.x[indices].tolist(), self.labels[indices].tolist()
        return [{"x": x, "label": y, "idx": i} for x, y, i in zip(xs, labels, indices)]


# ---- faults for the multi-process tests -------------------------------------------------------


class MarkedBlobs(Blobs):
    """Blobs with chosen samples broken: ``nan_ids`` get a NaN feature; ``heavy_ids`` a marker
    (feature 1 set to 1000) that :class:`Hog` reacts to. With ``data.shuffle: false`` and a global
    batch ``B`` over ``W`` ranks, sample ``i`` is in step ``i // B + 1`` on rank ``(i % B) // (B // W)``."""

    def __init__(self, nan_ids: tuple = (), heavy_ids: tuple = (), **kw):
        super().__init__(**kw)
        self.nan_ids, self.heavy_ids = set(nan_ids), set(heavy_ids)

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i in self.nan_ids:
            item["x"][0] = float("nan")
        if i in self.heavy_ids:
            item["x"][1] = 1000.0
        return item


class Hog(MLP):
    """The MLP, but a micro-batch of more than ``rows`` rows holding a marked sample allocates
    ``mb`` MiB more: past a ``--memory-budget`` it runs out of memory until the micro-batch is split."""

    def __init__(self, rows: int = 4, mb: int = 64, **kw):
        super().__init__(**kw)
        self.rows, self.nbytes = rows, mb * 2**20

    def forward(self, x, label=None):
        if x.shape[0] > self.rows and bool((x[:, 1] > 500).any()):
            torch.empty(self.nbytes // 4)
        return super().forward(x, label)


class NormBlocks(nn.Module):
    """Blocks of BatchNorm-Linear-ReLU in an nn.ModuleList (FSDP2 shards each block). A sample
    marked by :class:`MarkedBlobs`'s ``heavy_ids`` (feature 1 = 1000) overflows to inf before the
    first BatchNorm, which spreads it over every row of the micro-batch: only halving finds the
    sample, down to parts of one sample, which BatchNorm cannot normalize alone in training mode."""

    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 4, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(dim if i == 0 else hidden), nn.Linear(dim if i == 0 else hidden, hidden), nn.ReLU())
            for i in range(blocks))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        h = x * torch.exp(x[:, 1:2] / 10)  # exp(100) overflows float32 on a marked sample only
        for block in self.blocks:
            h = block(h)
        return classified(self.head(h), label)


class _TrapBlock(nn.Module):
    """Linear-ReLU; on rank 1 only, through the custom op torch.compile cannot trace (the value is unchanged)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        import os

        if os.environ.get("RANK") == "1":
            h = _double(h) / 2
        return torch.relu(self.lin(h))


class CompileTrap(nn.Module):
    """Blocks (an nn.ModuleList, sharded one by one under fsdp) whose compile fails on rank 1 only."""

    def __init__(self, dim: int = 8, classes: int = 4, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(_TrapBlock(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        for block in self.blocks:
            x = block(x)
        return classified(self.head(x), label)


class PairsOnly(NormBlocks):
    """:class:`NormBlocks` that refuses an odd number of samples (a model that cannot run one alone)."""

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        if x.shape[0] % 2:
            raise ValueError("this model takes samples in pairs")
        return super().forward(x, label)


class HostReads(Hook):
    """Counts host reads of tensor values per step (dispatch-level ``aten._local_scalar_dense``: ``.item()``,
    ``float()``, ``bool()``; plus ``Tensor.tolist``), from its STEP_START to the end of its STEP_END (hooks
    before this one included; the next batch's loading, where a dataset may read its own tensors, not), and writes
    ``{"reads": {step: n}, "lag": [...]}`` to ``path`` at the end. ``lag``: per step, the step whose
    verdict the host had read when this step's backward was done, and whether this step's own was
    still unread at its STEP_END. It reads no value itself (``needs_verdict`` False)."""

    def __init__(self, path: str):
        self.path = path
        self.reads: dict[int, int] = {}
        self.lag: list = []

    def needs_verdict(self, trainer) -> bool:
        return False

    def on_fit_start(self, trainer) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        hook = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    hook._count()
                return func(*args, **(kwargs or {}))

        self._tolist = torch.Tensor.tolist

        def tolist(t, *a, **k):
            hook._count()
            return hook._tolist(t, *a, **k)

        torch.Tensor.tolist = tolist
        self.step, self.on = trainer.state.step + 1, False
        self.mode = Mode()
        self.mode.__enter__()

    def _count(self) -> None:
        if self.on:
            self.reads[self.step] = self.reads.get(self.step, 0) + 1

    def on_step_start(self, trainer) -> None:
        self.step, self.on = trainer.state.step + 1, True

    def on_after_backward(self, trainer) -> None:
        v = trainer.state.verdict
        self.lag.append([trainer.state.step + 1, v.step if v is not None else None])

    def on_step_end(self, trainer) -> None:
        self.lag[-1].append(getattr(trainer, "pending", None) is not None)
        self.on = False

    def on_fit_end(self, trainer) -> None:
        import json

        self.mode.__exit__(None, None, None)
        torch.Tensor.tolist = self._tolist
        path = self.path if trainer.world.rank == 0 else f"{self.path}.rank{trainer.world.rank}"
        with open(path, "w") as f:
            json.dump({"reads": self.reads, "lag": self.lag}, f)


class CudaSyncs(Hook):
    """Counts the synchronizing CUDA operations of each step, from its STEP_START to the end of its
    STEP_END, under ``torch.cuda.set_sync_debug_mode("warn")``, and writes ``{step: n}`` to ``path`` at
    the end (steps without one left out). Reads no value itself (``needs_verdict`` False)."""

    def __init__(self, path: str):
        self.path, self.syncs = path, {}
        self._catch = None

    def needs_verdict(self, trainer) -> bool:
        return False

    def on_step_start(self, trainer) -> None:
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, trainer) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        n = sum("synchroniz" in str(w.message) for w in self._seen)
        if n:
            self.syncs[trainer.state.step] = n

    def on_fit_end(self, trainer) -> None:
        import json

        torch.cuda.set_sync_debug_mode("default")
        with open(self.path, "w") as f:
            json.dump(self.syncs, f)


class Keeps(MLP):
    """The MLP, but each training forward keeps a copy of its hidden activations (a leak: the
    memory grows step by step)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kept: list[torch.Tensor] = []

    def forward(self, x, label=None):
        if self.training:
            self.kept.append(self.body[0](x).detach().clone())
        return super().forward(x, label)


class Routed(MLP):
    """The MLP, but only the rows whose first feature is positive go through a second layer (a
    boolean mask: a shape made from the data's values, as a mixture of experts routes tokens)."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32):
        super().__init__(dim, classes, hidden)
        self.extra = nn.Linear(dim, dim)

    def forward(self, x, label=None):
        keep = x[:, 0] > 0
        x = x.clone()
        x[keep] = self.extra(x[keep])
        return super().forward(x, label)


class Counted(Hook):
    """Writes, per step, whether the simulated budget counted its operators (``trainer.memory.suspended``
    at AFTER_BACKWARD: False) to a JSON file at the run's end."""

    def __init__(self, path: str):
        self.path, self.steps = path, []

    def on_after_backward(self, trainer) -> None:
        self.steps.append(not trainer.memory.suspended)

    def on_fit_end(self, trainer) -> None:
        import json

        with open(self.path, "w") as f:
            json.dump(self.steps, f)


class NormBranch(nn.Module):
    """BatchNorm, then a branch on a value (whether a sample marked by :class:`MarkedBlobs`'s ``heavy_ids``
    is in the batch): a forward that takes one of two paths and moves its BatchNorm statistics."""

    def __init__(self, dim: int = 8, classes: int = 4, hidden: int = 32):
        super().__init__()
        self.norm, self.body, self.extra = nn.BatchNorm1d(dim), MLP(dim, classes, hidden), nn.Linear(dim, dim)

    def forward(self, x, label=None):
        h = self.norm(x)
        if bool((x[:, 1] > 500).any()):
            h = h + self.extra(h)
        return self.body(h, label)


class ReadsAtStart(Hook):
    """Reads the last step's loss at STEP_START (a value that changes every step), as a logging hook might."""

    def on_step_start(self, trainer) -> None:
        if trainer.state.loss is not None:
            self.last = trainer.state.loss.item()
