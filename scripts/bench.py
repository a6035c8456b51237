"""Per-step time of trainguard against a hand-written loop (and Lightning, when installed).

The same model, data, optimizer, batch and seed, run five ways in one process, interleaved
round by round so that the machine's drift hits all of them alike:

* ``hand``: the loop everyone writes: ``DataLoader(shuffle=True)``, forward, backward, AdamW;
* ``hand-fused``: the same loop with ``AdamW(fused=True)``;
* ``trainguard``: ``trainguard.train()`` with its defaults (guards, exact-resume data order,
  metrics every 50 steps, a checkpoint at the end; ``optim.fused: auto`` picks the fused AdamW);
* ``tg-sync``: the same, each step's verdict read at once (``TRAINGUARD_VERDICT=sync``: one host
  sync a step, as before 2026-12; by default it is read one step later, engine/defer.py);
* ``tg-unfused``: the same with ``optim.fused: false`` (torch's default AdamW, as ``hand``; its
  verdict is read at once: torch's default AdamW takes no ``found_inf``);
* ``lightning``: a ``LightningModule`` under ``lightning.Trainer`` without logger, checkpoint or
  progress bar, with ``hand``'s AdamW (only with ``pip install 'trainguard[bench]'``).

Per-step time is taken from two run lengths, (t(long) - t(short)) / (long - short) steps, so that
start-up (imports, building, the preflight, worker start) cancels. Workloads: a tiny MLP
(64-128-128-1, batch 64, where a per-step overhead shows) and a medium one (512-1024-1024-1,
batch 128); on a card (or with --only) also a large one (2048-8192-8192-1, batch 1024) and the
quickstart's character transformer (batch 32; the hand loops call it with input_ids and labels,
Lightning is not run on it). Prints each per-step time, its ratio to the hand loop with the same optimizer kernel
(the engine's own cost) and to the plain hand loop; docs/benchmarks.md holds the table.

    python scripts/bench.py [--rounds 5] [--only tiny]
    python scripts/bench.py --device cuda [--precision bf16] [--tf32 off] [--workers 4]  # on a card: the hand loops move each
        batch with pin_memory + non_blocking and run under torch.autocast, as a careful hand loop does
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

WORKLOADS = {  # name: (input, hidden, batch, short run, long run); input 0: the quickstart transformer
    "tiny": (64, 128, 64, 200, 2000),
    "medium": (512, 1024, 128, 30, 230),
    "large": (2048, 8192, 1024, 30, 230),  # a card's workload: ~1.5 ms of matrix work a step on an H100
    "quickstart": (0, 0, 32, 30, 230),  # configs/quickstart.yaml's CharTransformer (0.42M) on its stdlib text
}
LM = dict(block_size=64, dim=128, layers=2, heads=4)  # configs/quickstart.yaml's model
N_SAMPLES = 8192
LR = 1e-3
DEVICE, PRECISION, WORKERS, TF32, COMPILE = "cpu", "fp32", 0, False, False  # --device, --precision, --workers, --tf32, --compile
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Regression(Dataset):
    """(x, y) pairs of a fixed random linear task: tensors, as a tensor dataset would give them."""

    def __init__(self, dim: int = 64, n: int = N_SAMPLES, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) * 0.1 + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def mlp(dim: int = 64, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def run_hand(dim: int, hidden: int, batch: int, steps: int, fused: bool | None = None) -> float:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = TF32  # as trainguard's train.tf32
    dev = torch.device(DEVICE)
    if dim:
        model, loss_fn, data = mlp(dim, hidden).to(dev), nn.MSELoss(), Regression(dim)
    else:
        from trainguard.examples.charlm import CharTransformer, StdlibChars

        model, data = CharTransformer(**LM).to(dev), StdlibChars(split="train", block_size=LM["block_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)
    if COMPILE:
        model = torch.compile(model)
    cuda = dev.type == "cuda"
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=cuda,
                        num_workers=WORKERS, persistent_workers=WORKERS > 0)
    scaler = torch.amp.GradScaler(enabled=PRECISION == "fp16")
    t = time.perf_counter()
    step = 0
    while step < steps:
        for b in loader:
            x, y = (b["input_ids"], b["labels"]) if not dim else b
            if cuda:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=AMP.get(PRECISION, torch.float32), enabled=PRECISION in AMP):
                loss = loss_fn(model(x), y) if dim else model(x, y)["loss"]
            opt.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            if step == steps:
                break
    float(loss)
    return time.perf_counter() - t


def run_trainguard(dim: int, hidden: int, batch: int, steps: int, fused="auto", sync: bool = False) -> float:
    import trainguard
    from trainguard.engine import loop

    loop.DEFER = not sync  # TRAINGUARD_VERDICT=sync: every step's verdict read at once

    lm = {"model": {"_target_": "trainguard.examples.charlm:CharTransformer", **LM},
          "data": {"train": {"_target_": "trainguard.examples.charlm:StdlibChars", "split": "train",
                             "block_size": LM["block_size"]}, "num_workers": WORKERS}}
    cfg = {"hardware": "cpu" if DEVICE == "cpu" else "auto", "seed": 0,
           **({"model": {"_target_": "scripts.bench:mlp", "dim": dim, "hidden": hidden},
               "loss": {"_target_": "torch.nn:MSELoss"},
               "data": {"train": {"_target_": "scripts.bench:Regression", "dim": dim}, "num_workers": WORKERS}}
              if dim else lm),
           "optim": {"name": "adamw", "lr": LR, "fused": fused}, "schedule": {"name": "constant"},
           "train": {"max_steps": steps, "batch_size": batch, "micro_batch_size": batch, "grad_clip": 0, "log_every": 50,
                     "precision": PRECISION, "compile": COMPILE, "tf32": TF32},  # as the hand loops
           "checkpoint": {"every_steps": 0, "keep_last": 1}, "log": {"progress": False}}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        trainguard.train(cfg, run_dir=Path(d) / "run", resume="never")
        return time.perf_counter() - t


def run_lightning(dim: int, hidden: int, batch: int, steps: int) -> float:
    import lightning as L

    if not dim:
        return float("nan")  # the MLPs only

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.loss_fn = mlp(dim, hidden), nn.MSELoss()

        def training_step(self, b, i):
            x, y = b
            return self.loss_fn(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    torch.manual_seed(0)
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(PRECISION, "32-true")
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision=precision,
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(Regression(dim), batch_size=batch, shuffle=True, drop_last=True, pin_memory=DEVICE == "cuda",
                        num_workers=WORKERS, persistent_workers=WORKERS > 0)
    t = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - t


# name -> (runner, the hand loop with the same optimizer implementation, what it is)
RUNNERS = {
    "hand": (run_hand, "hand", "hand-written loop, AdamW as everyone writes it (torch's default kernel)"),
    "hand-fused": (functools.partial(run_hand, fused=True), "hand-fused", "hand-written loop, AdamW(fused=True)"),
    "trainguard": (run_trainguard, "hand-fused", "trainguard, defaults (optim.fused: auto = fused AdamW here)"),
    "tg-sync": (functools.partial(run_trainguard, sync=True), "hand-fused",
                "trainguard, each step's verdict read at once (TRAINGUARD_VERDICT=sync: one host sync a step)"),
    "tg-unfused": (functools.partial(run_trainguard, fused=False), "hand", "trainguard, optim.fused: false"),
    "lightning": (run_lightning, "hand", "Lightning, the same AdamW as `hand`"),
}


def main() -> None:
    import contextlib
    import io
    import logging
    import warnings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=None, help=f"workloads, comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                    help="fp32 on the CPU; bf16 by default on a card")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes, the same for every loop")
    ap.add_argument("--tf32", choices=["on", "off"], default=None, help="TF32 matmuls in every loop (on a card: on)")
    ap.add_argument("--compile", choices=["on", "off"], default="off", help="torch.compile the model in every loop")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(WORKLOADS):
        ap.error(f"--only: unknown workload {sorted(set(only) - set(WORKLOADS))}; choose from {', '.join(WORKLOADS)}")
    global DEVICE, PRECISION, WORKERS, TF32, COMPILE
    DEVICE, PRECISION, WORKERS = args.device, args.precision or ("bf16" if args.device == "cuda" else "fp32"), args.workers
    TF32 = (args.tf32 or ("on" if args.device == "cuda" else "off")) == "on"
    COMPILE = args.compile == "on"
    runners = dict(RUNNERS)
    try:
        import lightning  # noqa: F401

        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    except ImportError:
        del runners["lightning"]
        print("lightning is not installed (pip install 'trainguard[bench]'): comparing hand and trainguard only")

    where = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {PRECISION}, TF32 {'on' if TF32 else 'off'}, compile {args.compile}, {WORKERS} data workers, {args.rounds} rounds, "
          "per-step time from two run lengths")
    for k, (_, base, what) in runners.items():
        print(f"  {k:<11} {what}")
    print("ratio: to the hand loop with the same optimizer kernel (per round, then the median); "
          "vs hand: to the plain hand loop")
    for name, (dim, hidden, batch, short, long) in WORKLOADS.items():
        if (only and name not in only) or (not only and name in ("large", "quickstart") and DEVICE == "cpu"):
            continue
        per_step: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for k, (run, _, _) in runners.items():
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    a = run(dim, hidden, batch, short)
                    b = run(dim, hidden, batch, long)
                per_step[k].append((b - a) / (long - short))
        what = f"MLP {dim}-{hidden}-{hidden}-1" if dim else "the quickstart's CharTransformer (0.42M), block 64"
        print(f"\n{name}: {what}, batch {batch}, steps {short} and {long}")
        for k, (_, base, _) in runners.items():
            v = per_step[k]
            ratio = statistics.median(x / y for x, y in zip(v, per_step[base]))
            vs_hand = statistics.median(x / y for x, y in zip(v, per_step["hand"]))
            print(f"  {k:<11} {statistics.median(v) * 1e3:7.3f} ms/step  (rounds {min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})  "
                  f"ratio {ratio:.2f} to {base:<10}  vs hand {vs_hand:.2f}")


if __name__ == "__main__":
    main()
