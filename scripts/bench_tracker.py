"""What ``--memory-budget``'s simulated tracker costs a step on a CPU, side by side in one run.

For each zoo model (tests/zoo.py, tiny transformers configs; needs the dev extra) and the
quickstart: the same steps run untracked and under a budget that is never reached (the tracker
counts all the same: every step it must, memory/sampled.py), interleaved round by round; per-step time from two run lengths
((t(long) - t(short)) / (long - short) steps, so start-up cancels). Prints both and their ratio.

    python scripts/bench_tracker.py [--rounds 3] [--only t5,gpt2] [--profile t5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGET = 64 * 2**30  # never reached: the tracker counts, nothing raises


def configs(only: list[str] | None) -> dict[str, dict]:
    out = {}
    try:
        from tests.zoo import HEALTHY, zoo_config

        for name in HEALTHY:
            if not only or name in only:
                out[name] = zoo_config(name, log={"progress": False}, data={"val": None, "num_workers": 0})
    except ImportError as e:  # transformers absent: the quickstart only
        print(f"zoo skipped ({e})")
    if not only or "quickstart" in only:
        from trainguard.config.load import load_yaml_with_extends

        cfg = load_yaml_with_extends(REPO / "configs" / "quickstart.yaml")
        cfg.update(hardware="cpu", log={"progress": False}, checkpoint={"every_steps": 0})
        cfg["data"] = {**cfg["data"], "val": None, "num_workers": 0}
        cfg["train"] = {**cfg["train"], "eval_every": 0, "log_every": 50}
        out["quickstart"] = cfg
    return out


def run(cfg: dict, steps: int, budget: int | None) -> float:
    import trainguard

    cfg = {**cfg, "train": {**cfg["train"], "max_steps": steps}}
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        t = time.perf_counter()
        trainguard.train(cfg, run_dir=Path(d) / "run", resume="never", memory_budget=budget)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated names (zoo models, quickstart)")
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=88)  # past one refresh (memory/sampled.py)
    ap.add_argument("--profile", default=None, help="a name: cProfile one tracked run of it, top functions")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cfgs = configs(args.only.split(",") if args.only else None)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds, steps {args.short} and {args.long}")
    for name, cfg in cfgs.items():
        per = {"untracked": [], "tracked": []}
        try:
            for _ in range(args.rounds):
                for k, budget in (("untracked", None), ("tracked", BUDGET)):
                    per[k].append((run(cfg, args.long, budget) - run(cfg, args.short, budget)) / (args.long - args.short))
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the others go on
            print(f"{name:<11} failed: {type(e).__name__}: {e}")
            continue
        u, t = statistics.median(per["untracked"]), statistics.median(per["tracked"])
        ratio = statistics.median(a / b for a, b in zip(per["tracked"], per["untracked"]))
        fastest = min(per["tracked"]) / min(per["untracked"])  # the quietest round of each: the least noise
        print(f"{name:<11} untracked {u * 1e3:8.2f} ms/step  tracked {t * 1e3:8.2f} ms/step  ratio {ratio:.2f}"
              f"  fastest {fastest:.2f}"
              f"  (rounds {', '.join(f'{a / b:.2f}' for a, b in zip(per['tracked'], per['untracked']))})")
    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        run(cfgs[args.profile], args.long, BUDGET)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
