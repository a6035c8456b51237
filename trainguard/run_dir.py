"""The run directory across attempts: where a run resumes from, what an earlier run left there, and
whether a config may continue a checkpoint.

* :func:`find_resume`: ``--resume auto|never|<path>`` to the checkpoint to start from, and those rejected;
* :func:`set_aside`: starting afresh moves the earlier run's files into ``previous-<time>/`` (nothing deleted);
* :func:`config_diff`: the training-relevant fields a resume may not change;
* :func:`completed_run`: a re-run of a completed run is a no-op.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trainguard.callbacks.summary import read_summary
from trainguard.checkpoint import store
from trainguard.config.schema import Config
from trainguard.errors import ConfigError

# Config fields that may differ when resuming: they do not change what a step computes.
# micro_batch_size: accumulation gives the same gradient (up to float rounding), so a run may
# resume on a smaller card with smaller micro-batches; optim.fused: the same update up to float rounding.
RESUMABLE_CHANGES = ("hardware", "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.micro_batch_size", "train.compile", "optim.fused", "data.item_seeding", "data.num_workers",
                     "data.pin_memory", "checkpoint.", "log.", "guard.", "hooks", "memory.")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    # a component spec is one value, except the optimizer's and schedule's own (optim.fused may change)
    if isinstance(d, dict) and not (prefix and "_target_" in d and prefix not in ("optim.", "schedule.")):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _with_defaults(old: dict) -> dict:
    """A checkpoint's config with the defaults of keys added since it was written (they changed nothing)."""
    try:
        return Config.model_validate(old).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a config of an older layout: compared as written
        return old


def config_diff(old: dict, new: dict) -> list[str]:
    """Training-relevant fields that differ between two resolved configs, as readable lines."""
    a, b = _flatten(_with_defaults(old)), _flatten(new)
    # a schedule of the user's keeps its length in its own state (OneCycleLR's total_steps): not resumable longer
    fixed = ("train.max_steps", "train.epochs") if "_target_" in (new.get("schedule") or {}) else ()
    lines = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUMABLE_CHANGES) and key not in fixed or a.get(key) == b.get(key):
            continue
        why = " (schedule._target_ keeps the run's length in its state)" if key in fixed else ""
        lines.append(f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now{why}")
    return lines


PREVIOUS_RUN_FILES = ("checkpoints", "metrics.jsonl", "events.jsonl", "summary.json", "config.yaml", "tb")


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run's files into ``run_dir/previous-<time>/`` (nothing is deleted)."""
    aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for name in PREVIOUS_RUN_FILES:
        if (run_dir / name).exists():
            (run_dir / name).rename(aside / name)
    return aside


def default_run_dir(config_path: str | Path | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "run")


def find_resume(resume: str, ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    if resume == "never":
        return None, []
    if resume == "auto":
        return store.latest_valid(ckpt_root)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found, rejected = store.latest_valid(path / "checkpoints")
        if found is None:
            raise ConfigError(f"--resume {resume}: no valid checkpoint there"
                              + "".join(f"\n{bad.name}: {why}" for bad, why in rejected), "use --resume auto or never")
        return found, rejected
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory", "give a checkpoints/step_NNNNNNN directory, auto or never")
    why = store.verify(path)
    if why:
        raise ConfigError(f"--resume {resume}: the checkpoint does not verify: {why}", "pick an older checkpoint, or --resume auto")
    why = store.check_loadable(path)  # checksums that match a file that does not load weights-only
    if why:
        raise ConfigError(f"--resume {resume}: the checkpoint does not load: {why}",
                          "pick an older checkpoint (checkpoints/step_NNNNNNN), or --resume auto, which skips it")
    return path, []


def completed_run(run_dir: Path, found: Path | None, old: dict | None, cfg: Config) -> tuple[dict, int] | None:
    """The run's summary.json and max_steps if it completed at ``found``, its newest valid checkpoint,
    with nothing left to train under ``cfg``; None otherwise. A raised ``train.max_steps`` continues the run,
    and a config that differs where it matters is refused later, where it always is."""
    prev = read_summary(run_dir / "summary.json")
    if (prev is None or found is None or old is None or prev.get("status") != "completed"
            or found.parent != run_dir / "checkpoints" or prev.get("steps") != store.step_of(found)):
        return None
    same = cfg.model_copy(deep=True)
    if cfg.train.epochs is not None:  # train.epochs becomes max_steps once the data is built: the run's, if the same
        if cfg.train.epochs != old["train"].get("epochs"):
            return None
        same.train.max_steps = old["train"]["max_steps"]
    if prev["steps"] < same.train.max_steps or config_diff(old, same.model_dump(mode="json")):
        return None
    return {**prev, "run_dir": str(run_dir)}, old["train"]["max_steps"]  # the run's own length (a lowered one changes nothing)
