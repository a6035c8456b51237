"""The micro-batch measured on the device in hand, and remembered.

* :func:`tune`: real trial steps on the worst-case batch (CUDA, or a simulated
  ``--memory-budget``) find the largest micro-batch that fits ``(1 - headroom)`` of the memory;
  a batch is then split into the fewest micro-batches of at most that
  (:func:`~trainguard.memory.search.fewest_micro_batches`: 256 at most 86 is 86, 85, 85), and the
  effective batch is unchanged.
* :func:`cached_tune`: the same, remembered per (model, data, optimizer, batch, precision, device),
  so the next run on that hardware starts tuned. A stale entry is harmless: an OOM splits.

:class:`Tuning` is the answer of both, and of the forecast for a card that is not here
(:mod:`~trainguard.memory.profile_forecast`), which shares the search's choice of a split.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainguard.errors import RunFailed
from trainguard.memory.search import SearchResult, fewest_micro_batches, search
from trainguard.memory.sizes import fmt_bytes, one_sample_does_not_fit
from trainguard.memory.trial import Trial


@dataclass
class Tuning:
    """What autoconfig chose, and why (the ``--json`` output has these fields)."""

    micro_batch_size: int
    grad_accum: int
    batch_size: int
    precision: str
    num_workers: int
    memory_limit_bytes: int | None       # what the run may use: the budget, else the device's memory
    usable_bytes: int | None             # less the headroom (and, predicted, a card's fixed costs)
    predicted_peak_bytes: int | None     # the peak at micro_batch_size (measured or predicted, see `method`)
    method: str                          # measured | predicted | cached | none
    max_micro_batch_size: int            # the largest micro-batch that fits (micro_batch_size: the fewest micro-batches of at most it)
    trials: int = 0
    device: str = ""
    profile: str = ""
    notes: list[str] = field(default_factory=list)
    processes: int = 1                   # micro_batch_size x grad_accum x processes = batch_size
    forecast: str = ""                   # predicted: "fake" (fake-tensor steps) or "measured" (real CPU steps, budgeted)

    def as_json(self) -> dict:
        return asdict(self)

    def split(self) -> str:
        """How one process's share is split: ``micro-batch 64 x 4 accumulation``, or, where the share is
        not a multiple, ``3 micro-batches of 86 or 85`` (the fewest that fit, within one sample)."""
        from trainguard.engine.batch import describe_split

        return describe_split(self.batch_size // max(1, self.processes), self.micro_batch_size)


def usable_bytes(memory, headroom: float) -> int:
    """Bytes a step may peak at: the limit less the headroom, and on a CUDA card without a budget
    less what other processes (and the CUDA context) already hold."""
    usable = int(memory.limit * (1 - headroom))
    if memory.kind == "cuda" and not memory.budget:
        import torch

        free, total = torch.cuda.mem_get_info(memory.device)
        others = total - free - torch.cuda.memory_reserved(memory.device)
        usable -= max(0, others)
    return usable


def _fewest(res: SearchResult, measure: Callable[[int], Trial], batch_size: int,
                 on_trial: Callable[[Trial], None] | None, extra: int = 3) -> None:
    """The fewest micro-batches that fit, checked: the search stops within 5% of the largest size,
    so the split with one micro-batch fewer (``ceil(batch_size / (k - 1))`` samples each, for ``k``
    micro-batches of at most ``res.largest``) may still fit. It is measured unless a smaller size
    already did not fit, at most ``extra`` times.

    The whole batch is the one exception to "memory grows with the micro-batch": with no
    accumulation no gradient is held from an earlier micro-batch, so it can fit where one sample
    less, accumulating, does not. It is measured when one micro-batch fewer means the whole batch
    (the search stopped short of it by at most half), whatever smaller sizes did."""
    for _ in range(extra):
        k = -(-batch_size // res.largest) if res.largest else 0
        if k < 2:
            return
        fewer = -(-batch_size // (k - 1))
        if any(t.m == fewer for t in res.trials) or (
                fewer < batch_size and any(t.m <= fewer and not t.fits(res.usable) for t in res.trials)):
            return
        t = measure(fewer)
        res.trials.append(t)
        if on_trial:
            on_trial(t)
        if not t.fits(res.usable):
            return
        res.largest = fewer


def _batch(batch_size: int, processes: int) -> str:
    """How the notes name the samples a micro-batch must divide: one process's share in a job."""
    return (f"train.batch_size {batch_size}" if processes == 1 else
            f"the {batch_size} samples per process (train.batch_size {batch_size * processes} / {processes})")


def _choose(res: SearchResult, batch_size: int, processes: int = 1) -> tuple[int, list[str]]:
    from trainguard.engine.batch import describe_split

    m = fewest_micro_batches(batch_size, res.largest)
    notes = []
    if batch_size % m:
        notes.append(f"up to {res.largest} samples fit per micro-batch: {_batch(batch_size, processes)} in "
                     + describe_split(batch_size, m))
    return m, notes


def too_small(need: int | None, usable: int, limit: int, headroom: float, where: str = "") -> RunFailed:
    return RunFailed(*one_sample_does_not_fit(
        need, f"{fmt_bytes(usable)} usable{where} ({fmt_bytes(limit)} less {headroom:.0%} headroom)"))


def tune(trainer, batch_size: int, headroom: float, on_trial: Callable[[Trial], None] | None = None,
         processes: int = 1) -> Tuning:
    """Search the largest micro-batch on ``trainer``'s device; the trainer is left as it was.

    Must run before the first step (see :func:`trainguard.memory.trial.preserved`).
    """
    from trainguard.memory import trial
    from trainguard.memory.meter import host_side

    mem = trainer.memory
    usable = usable_bytes(mem, headroom)
    with host_side(mem):  # items are read on the host: not counted (live) in the trial steps
        item = trainer.data.scan().worst_item
    def measure(m: int):
        return trial.measure(trainer, item, m, enforce=False, accumulate=m < batch_size, batch_size=batch_size)

    with trial.preserved(trainer):
        res = search(measure, usable, batch_size, on_trial=on_trial)
        if res.largest == 0:
            need = res.trials[0].peak if not res.trials[0].oom else None
            raise too_small(need, usable, mem.limit, headroom)
        _fewest(res, measure, batch_size, on_trial)
    m, notes = _choose(res, batch_size, processes)
    peak = next((t.peak for t in res.trials if t.m == m and not t.oom), None) or (round(res.lines.predict(m)) if res.lines else None)
    return Tuning(m, -(-batch_size // m), batch_size, trainer.precision, 0, mem.limit, usable, peak, "measured",
                  res.largest, len(res.trials), notes=notes)


# ---- the cache ---------------------------------------------------------------------------------------
def cache_path() -> Path:
    root = os.environ.get("TRAINGUARD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainguard"
    return Path(root) / "autoconfig.json"


def cache_key(cfg, device_name: str, limit: int | None) -> str:
    import torch

    what = {"model": cfg.model, "loss": cfg.loss, "data": cfg.data.train, "fields": cfg.data.fields,
            "optim": cfg.optim.model_dump(mode="json"), "batch_size": cfg.train.batch_size,
            "precision": cfg.train.precision, "headroom": cfg.memory.headroom, "device": device_name,
            "limit": limit, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached_tune(trainer, cfg, device_name: str, on_trial=None, world: int = 1) -> tuple[Tuning, bool]:
    """:func:`tune`, or its remembered answer for the same model, config and device. Returns (tuning, from_cache).
    With ``world`` ranks each takes ``batch_size / world`` samples a step: the search is for that share."""
    key = cache_key(cfg, device_name, trainer.memory.limit) + (f"/world{world}" if world > 1 else "")
    hit = _read_cache().get(key)
    if hit:
        return Tuning(**{**hit, "method": "cached"}), True
    tuning = tune(trainer, cfg.train.batch_size // world, cfg.memory.headroom, on_trial, world)
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = {**tuning.as_json(), "notes": tuning.notes + [f"searched {time.strftime('%Y-%m-%d %H:%M')}"]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: tuning still works, it is only not remembered
        pass
    return tuning, False
