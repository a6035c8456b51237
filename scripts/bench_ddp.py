"""Per-step time of trainguard in N processes against a hand-written DistributedDataParallel loop.

The same model, data, fused AdamW, global batch and accumulation, both launched through torchrun
(gloo on a CPU, NCCL on GPUs), interleaved round by round:

* ``hand-ddp``: the loop a user writes: ``DistributedSampler``, the model wrapped in
  ``DistributedDataParallel``, ``no_sync()`` on every micro-batch but the last, whose backward
  overlaps the gradient all-reduce with the computation;
* ``trainguard``: ``trainguard train --nproc-per-node N``: every micro-batch local, then the step's
  one flag exchange, then the gradients averaged in 25 MiB buckets (no overlap: the price of
  never leaving a rank inside a collective when another ran out of memory).

Per-step time from two run lengths (the hand loop times itself on rank 0; trainguard's is
``summary.json``'s ``wall_s``), so start-up cancels. The medium MLP of scripts/bench.py
(512-1024-1024-1, batch 128), where the gradient (2.6 M parameters, 10 MiB) is worth reducing.

    python scripts/bench_ddp.py [--nproc 2] [--rounds 3] [--accum 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIM, HIDDEN, BATCH, SHORT, LONG, LR = 512, 1024, 128, 20, 120, 1e-3


def worker(steps: int, accum: int, out: str) -> None:
    """One rank of the hand-written DDP loop (run by torchrun)."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    sys.path.insert(0, str(REPO))
    from scripts.bench import Regression, mlp

    torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = DDP(mlp(DIM, HIDDEN).to(device))
    loss_fn = nn.MSELoss()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    data = Regression(DIM)
    share = BATCH // world
    loader = DataLoader(data, batch_size=share, sampler=DistributedSampler(data, shuffle=True, drop_last=True), drop_last=True)
    micro = share // accum
    t, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            for k in range(accum):
                xs, ys = x[k * micro:(k + 1) * micro], y[k * micro:(k + 1) * micro]
                if k < accum - 1:
                    with model.no_sync():
                        (loss_fn(model(xs), ys) / accum).backward()
                else:
                    (loss_fn(model(xs), ys) / accum).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
        epoch += 1
    float(loss_fn(model(x), y))
    elapsed = time.perf_counter() - t
    if rank == 0:
        Path(out).write_text(str(elapsed))
    torch.distributed.destroy_process_group()


def run_hand(nproc: int, steps: int, accum: int, tmp: Path) -> float:
    out = tmp / "hand.txt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    __file__, "--worker", "--steps", str(steps), "--accum", str(accum), "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": _threads(nproc)})
    return float(out.read_text())


def run_trainguard(nproc: int, steps: int, accum: int, tmp: Path) -> float:
    import yaml

    cfg = {"hardware": "auto", "seed": 0,
           "model": {"_target_": "scripts.bench:mlp", "dim": DIM, "hidden": HIDDEN},
           "loss": {"_target_": "torch.nn:MSELoss"},
           "data": {"train": {"_target_": "scripts.bench:Regression", "dim": DIM}, "num_workers": 0},
           "optim": {"name": "adamw", "lr": LR}, "schedule": {"name": "constant"},
           "train": {"max_steps": steps, "batch_size": BATCH, "micro_batch_size": BATCH // nproc // accum,
                     "grad_clip": 0, "log_every": 50},
           "checkpoint": {"every_steps": 0, "keep_last": 1}, "log": {"progress": False}}
    path = tmp / "tg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp / f"tg{steps}"
    subprocess.run([sys.executable, "-m", "trainguard", "train", "--config", str(path), "--run-dir", str(run_dir),
                    "--resume", "never", "--nproc-per-node", str(nproc)], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": _threads(nproc)})
    return json.loads((run_dir / "summary.json").read_text())["wall_s"]


def _threads(nproc: int) -> str:
    return str(max(1, (os.cpu_count() or 1) // nproc))


RUNNERS = {"hand-ddp": run_hand, "trainguard": run_trainguard}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per rank and step")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps, args.accum, args.out)
    import torch

    print(f"torch {torch.__version__}, {args.nproc} processes x {_threads(args.nproc)} threads, {args.rounds} rounds; "
          f"MLP {DIM}-{HIDDEN}-{HIDDEN}-1, global batch {BATCH} = {args.nproc} x {args.accum} x {BATCH // args.nproc // args.accum}, "
          f"steps {SHORT} and {LONG}")
    per_step: dict[str, list[float]] = {k: [] for k in RUNNERS}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for name, fn in RUNNERS.items():
                short, long = fn(args.nproc, SHORT, args.accum, Path(d)), fn(args.nproc, LONG, args.accum, Path(d))
                per_step[name].append((long - short) / (LONG - SHORT) * 1000)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in per_step.items()), flush=True)
    ratios = [t / h for t, h in zip(per_step["trainguard"], per_step["hand-ddp"])]
    for name, v in per_step.items():
        print(f"  {name:<11} {statistics.median(v):7.2f} ms/step  (rounds {min(v):.2f}-{max(v):.2f})")
    print(f"  trainguard / hand-ddp: {statistics.median(ratios):.2f} (per round {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
