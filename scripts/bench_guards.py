"""What the guards cost on healthy steps: the same engine with the Guard hook on and off.

    python scripts/bench_guards.py [--steps 60] [--rounds 3] [--config configs/quickstart.yaml] [--set KEY=VALUE]

Both variants are built from the same config and seed and run interleaved (on, off, on, off ...)
in one process, so machine noise hits both alike. Step time = time between consecutive
STEP_END events (data, forward/backward, optimizer, every hook), median over all steps after a
warm-up. The target is a ratio of at most 1.02.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainguard.config.load import resolve_config  # noqa: E402
from trainguard.engine.events import Hook  # noqa: E402
from trainguard.guards.guard import Guard  # noqa: E402
from trainguard.run import build_trainer  # noqa: E402


class StepClock(Hook):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, trainer) -> None:
        self.times.append(time.perf_counter())


def time_hook_methods(hook: Hook, spent: list[float]) -> None:
    """Accumulate the wall time spent inside ``hook``'s event methods into ``spent[0]``."""
    for name in dir(Hook):
        if name.startswith("on_"):
            fn = getattr(hook, name)

            def timed(trainer, fn=fn):
                t0 = time.perf_counter()
                fn(trainer)
                spent[0] += time.perf_counter() - t0
            setattr(hook, name, timed)


def run_once(config: str, steps: int, guards: bool, workdir: Path, extra: list[str], spent: list[float]) -> list[float]:
    overrides = [*extra, f"train.max_steps={steps}", "train.log_every=1000", "train.eval_every=0",
                 "checkpoint.every_steps=0", "log.progress=false"]
    cfg, prof, why = resolve_config(config, overrides=overrides)
    clock = StepClock()
    trainer = build_trainer(cfg, prof, why, run_dir=workdir / f"{'on' if guards else 'off'}-{time.time_ns()}",
                            resume="never", extra_hooks=[clock])
    if not guards:
        trainer.hooks = [h for h in trainer.hooks if not isinstance(h, Guard)]
    else:
        for h in trainer.hooks:
            if isinstance(h, Guard):
                time_hook_methods(h, spent)
    trainer.fit()
    diffs = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return diffs[5:]  # warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config overrides, as for trainguard train")
    args = ap.parse_args()
    on, off, spent = [], [], [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for guards, sink in ((True, on), (False, off)) if r % 2 == 0 else ((False, off), (True, on)):
                times = run_once(args.config, args.steps, guards, Path(tmp), args.sets, spent)
                sink += times
                print(f"round {r}: guards {'on ' if guards else 'off'} median {statistics.median(times) * 1e3:.2f} ms", flush=True)
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"config {args.config} {' '.join('--set ' + x for x in args.sets)}: {args.rounds} rounds x {args.steps} steps per variant, interleaved")
    print(f"median step time, guards on : {m_on * 1e3:8.2f} ms  ({len(on)} steps)")
    print(f"median step time, guards off: {m_off * 1e3:8.2f} ms  ({len(off)} steps)")
    print(f"ratio on/off: {m_on / m_off:.4f}  (target <= 1.02; A/B of two noisy medians)")
    per_step = spent[0] / (args.rounds * args.steps)
    print(f"time inside the Guard hook: {per_step * 1e6:.1f} us per step = {per_step / m_off:.2%} of a step")


if __name__ == "__main__":
    main()
