"""A run's lifecycle, and the public entry point :func:`train`.

``train()`` resolves the config (one precedence rule), probes the device, finds where the run
resumes (:mod:`trainguard.run_dir`), builds the parts (:mod:`trainguard.build`, shared with
diagnose and autoconfig), attaches the hooks in their declared order, resumes from the newest
valid checkpoint, and calls ``Trainer.fit()``. The CLI's ``trainguard train`` is a thin wrapper over it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import torch
import yaml

from trainguard import distributed
from trainguard.build import build_core, build_val_data, check_world_batch, console, device_of, resolve_runtime
from trainguard.callbacks.evaluate import Evaluator
from trainguard.callbacks.logging import ConsoleProgress, MetricsLogger
from trainguard.callbacks.runlog import RunLog
from trainguard.callbacks.sinks import open_sinks
from trainguard.callbacks.signals import SignalHandler
from trainguard.callbacks.summary import SummaryWriter, after_failed_setup, fmt_duration, read_summary, write_json_atomic
from trainguard.callbacks.timing import Timing
from trainguard.checkpoint import lock as run_lock
from trainguard.checkpoint import store
from trainguard.checkpoint.checkpointer import Checkpointer, restore_trainer
from trainguard.config.instantiate import instantiate
from trainguard.config.load import resolve_config
from trainguard.config.schema import Config
from trainguard.engine.events import Hook, HookOrderError, order_hooks
from trainguard.engine.loop import Trainer
from trainguard.engine.optim import notes as optim_notes
from trainguard.errors import ConfigError, RunFailed
from trainguard.guards.guard import Guard
from trainguard.guards.oom import JobRestart, OomRecovery, restart_pending
from trainguard.guards.preflight import batch_coupling, preflight, require
from trainguard.guards.stall import StallWatchdog, group_timeout
from trainguard.hardware.probe import probe
from trainguard.memory.meter import host_side, open_memory, prefer_expandable_segments
from trainguard.memory.sampled import SampledTracking
from trainguard.memory.sizes import fmt_bytes, parse_size
from trainguard.run_dir import PREVIOUS_RUN_FILES, completed_run, config_diff, default_run_dir, find_resume, set_aside



































def _tune_micro_batch(trainer: Trainer, cfg: Config, prof, info) -> int:
    """``micro_batch_size: auto`` on a device with a limit: the cached or searched largest that fits.
    Sharded (fsdp), forecast on fake tensors instead: a trial step that runs out of memory on one
    rank would leave the others in FSDP's collectives."""
    from trainguard.memory.autoconfig import cached_tune, predict_for_profile, sharded_forecast

    world = trainer.world.size
    with console.status("[bold]autoconfig[/bold]: searching the largest micro-batch that fits ..."):
        if trainer.strategy.sharded:
            share = cfg.model_copy(deep=True)
            share.train.batch_size //= world
            with host_side(trainer.memory):
                item = trainer.data.scan().worst_item
            fc = sharded_forecast(share, prof, trainer.memory, item, world)
            tuning, cached = predict_for_profile(share, prof, fc=fc, processes=world), False
        else:
            tuning, cached = cached_tune(trainer, cfg, info.name, world=world)
    if world > 1:  # every rank searched its own card: the smallest answer fits them all
        tuning = min(distributed.gather_objects(tuning), key=lambda t: t.micro_batch_size)
    how = ("from the cache (same model, config and device)" if cached else
           f"forecast for one of {world} ranks in {tuning.trials} fake-tensor steps" if trainer.strategy.sharded else
           f"measured in {tuning.trials} trial steps")
    console.print(f"[bold]autoconfig[/bold]: {tuning.split()} = batch {tuning.batch_size}, peak {fmt_bytes(tuning.predicted_peak_bytes)} of "
                  f"{fmt_bytes(tuning.usable_bytes)} usable ({how})")
    for n in tuning.notes:
        console.print(f"[yellow]note[/yellow]: {n}")
    return tuning.micro_batch_size


class RunComplete(Exception):
    """Raised by :func:`build_trainer` when the run directory holds this run completed: nothing to train."""

    def __init__(self, summary: dict, max_steps: int):
        super().__init__("the run is complete")
        self.summary, self.max_steps = summary, max_steps




def build_trainer(cfg: Config, prof, why: str, *, run_dir: Path, resume: str = "auto",
                  extra_hooks: Iterable[Hook] = (), memory_budget: int | None = None,
                  started: float | None = None) -> Trainer:
    """Build every part of the run from its own config section, and resume if there is a checkpoint.

    With a device memory limit (CUDA, or ``memory_budget`` bytes, simulated on a CPU) the returned
    trainer's ``memory`` is started; the caller stops it (:func:`train` does).
    """
    prefer_expandable_segments()
    info = probe(cfg.train.device)
    world = distributed.init(info.type, group_timeout(cfg.guard.stall_timeout))
    if world.size > 1:
        check_world_batch(cfg, world.size)
        console.quiet = not world.is_main  # one console: rank 0's
    auto_micro = cfg.train.micro_batch_size == "auto"
    auto_workers = cfg.data.num_workers == "auto"
    cfg, notes = resolve_runtime(cfg, prof, info, world.size)
    console.print(f"[bold]trainguard[/bold]: device {info.name} ({info.type}), profile [bold]{prof.name}[/bold] ({why}), precision {cfg.train.precision}"
                  + (f", memory budget {fmt_bytes(memory_budget)}" if memory_budget else ""))
    for n in notes:
        console.print(f"[yellow]note[/yellow]: {n}")
    device = device_of(info)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    found, rejected = distributed.broadcast_object(find_resume(resume, run_dir / "checkpoints") if world.is_main else None)
    old = yaml.safe_load((found / "config.yaml").read_text()) if found is not None else None
    if found is not None and store.world_size(found) != world.size:  # per-rank RNG streams: not an exact resume
        saved = store.world_size(found)
        procs = lambda n: f"{n} process{'es' if n > 1 else ''}"  # noqa: E731
        raise ConfigError(f"cannot resume from {found}: it was saved by {procs(saved)}, this run has {world.size}",
                          f"run with {procs(saved)} (--nproc-per-node {saved}) to continue it exactly, "
                          "or start afresh with --resume never")
    if old is not None and auto_micro:  # resume as it ran, without searching again
        cfg.train.micro_batch_size = old["train"]["micro_batch_size"]
    if old is not None and auto_workers:  # and with its loader workers: a stream's parts are per worker
        cfg.data.num_workers = old["data"]["num_workers"]
    done = distributed.broadcast_object(completed_run(run_dir, found, old, cfg) if world.is_main else None)
    if done is not None:  # nothing to train: said before anything is built or written
        raise RunComplete(*done)

    memory = open_memory(device, memory_budget)
    if memory is not None:
        memory.start()
    try:
        trainer = build_core(cfg, device, memory, world=world)
        if auto_micro and old is None and memory is not None:
            cfg.train.micro_batch_size = trainer.micro_batch_size = _tune_micro_batch(trainer, cfg, prof, info)
        _attach_run(trainer, cfg, prof, info, run_dir, found, old, rejected, extra_hooks, started or time.time())
    except BaseException:
        if memory is not None:
            memory.stop()
        raise
    return trainer


def _attach_run(trainer: Trainer, cfg: Config, prof, info, run_dir: Path, found: Path | None, old: dict | None,
                rejected: list, extra_hooks: Iterable[Hook], started: float) -> None:
    """The run directory, the hooks, the resume and the preflight around a built core."""
    mbs, world = int(cfg.train.micro_batch_size), trainer.world
    val = build_val_data(cfg, trainer.strategy, trainer.data.collate_fn)

    writer = world.is_main  # one writer per run directory: rank 0 of a process group
    log = RunLog(run_dir, enabled=writer)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    ckpt_root = run_dir / "checkpoints"
    had_checkpoints = found is None and not rejected and bool(store.list_checkpoints(ckpt_root))  # --resume never
    if found is not None:
        diff = config_diff(old, cfg.model_dump(mode="json"))
        if diff:
            raise ConfigError(f"cannot resume from {found}: training-relevant config differs:\n  " + "\n  ".join(diff),
                              "restore those values, or start afresh with --resume never (or another --run-dir)")
    elif writer and restart_pending(run_dir):  # the same job again, after a rank left it out of memory
        log.truncate_after(0)
    elif writer and any((run_dir / n).exists() for n in PREVIOUS_RUN_FILES):
        aside = set_aside(run_dir)  # starting afresh: the earlier files are kept, not mixed in
        console.print(f"[yellow]note[/yellow]: starting afresh; moved the earlier run's files to {aside}")
    for i, (bad, reason) in enumerate(rejected):
        older = found is not None or i + 1 < len(rejected)
        kept = store.set_aside_rejected(bad) if writer and bad.parent == ckpt_root and bad.is_dir() else None
        console.print(f"[yellow]warning[/yellow]: skipping checkpoint {bad}: {reason}; "
                      + (f"kept as {kept.name}; " if kept else "")
                      + ("falling back to an older one" if older else "there is no older one"))
        log.event(store.step_of(bad), "checkpoint_corrupt", reason, path=str(bad), **({"kept_as": str(kept)} if kept else {}))
    if writer:
        (run_dir / "config.yaml").write_text(config_yaml)

    sinks = open_sinks(cfg.log, run_dir, log, cfg.model_dump(mode="json"), config_yaml) if writer else None
    stall = StallWatchdog(cfg.guard.stall_timeout, run_dir, log, cfg.guard.remember_bad_samples)
    try:
        metrics = MetricsLogger(log, cfg.train.log_every, cfg.train.max_steps, sinks, memory=trainer.memory)
        checkpointer = Checkpointer(ckpt_root, cfg.checkpoint, config_yaml, log)
        hooks: list[Hook] = [Timing(started), metrics]  # the built-in hooks, then the user's, then the record's
        if SampledTracking.enabled(trainer):  # first at STEP_END (the logger reads its peak); its window opens last
            sampling = SampledTracking(trainer.memory, log)  # at STEP_START
            hooks[:0] = [sampling, sampling.companion()]
        if writer:  # one progress display: rank 0's
            hooks.append(ConsoleProgress(metrics, cfg.train.max_steps, cfg.log.progress))
        oom = OomRecovery(cfg.guard.on_oom, cfg.train.batch_size // world.size, log, mbs, run_dir)
        hooks += [Guard(cfg.guard, cfg.train.max_steps * cfg.train.batch_size, log, checkpointer), oom]
        if val is not None and cfg.train.eval_every:
            hooks.append(Evaluator(val, cfg.train.eval_every, cfg.train.eval_batches))
        hooks.append(checkpointer)
        hooks.append(stall)
        hooks += [instantiate(h, f"hooks[{i}]") for i, h in enumerate(cfg.hooks)]
        hooks += list(extra_hooks)
        for h in hooks:
            if not isinstance(h, Hook):
                raise ConfigError(f"hook {type(h).__name__} is not a trainguard.Hook", "subclass trainguard.Hook")
        info_fields = {"precision": cfg.train.precision, "device": info.name, "profile": prof.name, "run_dir": str(run_dir)}
        if world.size > 1:
            info_fields["world_size"] = world.size
        hooks += [SummaryWriter(run_dir, info_fields, log, write=writer, rank=world.rank, started=started), SignalHandler(log)]
        try:
            trainer.hooks = order_hooks(hooks)  # each hook's `after`; the order above otherwise
        except HookOrderError as e:
            raise ConfigError(str(e), "remove one of them from the other's `after`") from None

        if found is not None:
            ts = restore_trainer(trainer, found)
            if old["train"]["micro_batch_size"] == mbs:  # continue with the micro-batch it had (after OOM splits)
                trainer.micro_batch_size = int(ts.get("micro_batch_size") or mbs)
            log.truncate_after(trainer.state.step)
            stream = trainer.data.resume_note()  # a stream: from its saved state, or replayed (how many items)
            log.event(trainer.state.step, "resume", f"resumed from {found} at step {trainer.state.step}" + (f"; {stream}" if stream else ""), path=str(found),
                      micro_batch_size=trainer.micro_batch_size,
                      **({"stream_replayed": trainer.data.replayed_items()} if stream else {}))
            console.print(f"resumed from {found} at step {trainer.state.step}"
                          + (f" (micro-batch {trainer.micro_batch_size})" if trainer.micro_batch_size != mbs else "")
                          + (f"; {stream}" if stream else ""))
        else:  # said as plainly as a resume: a kill before the first checkpoint is no silent restart
            where = (f"no valid checkpoint ({len(rejected)} rejected, left on disk): starting at step 0" if rejected else
                     "starting afresh at step 0 (--resume never)" if had_checkpoints else "no checkpoint yet: starting at step 0")
            console.print(where)
            log.event(0, "start", f"{where}; device {info.name}, profile {prof.name}, precision {cfg.train.precision}"
                      + (f", {world.size} processes" if world.size > 1 else ""), micro_batch_size=mbs,
                      **({"world_size": world.size} if world.size > 1 else {}))
        for n in [*optim_notes(trainer.optimizer, trainer.scheduler), trainer.data.split_note()]:  # said once at start
            if n is None:
                continue
            console.print(f"[yellow]note[/yellow]: {n}")
            log.event(trainer.state.step, "note", n)
        oom.after_restart(trainer)
        stall.watch(trainer)  # the preflight (and compile) is watched too, with the first step's allowance
        checks = preflight(trainer, coupling=trainer.grad_accum > 1)
        for c in checks:
            if c.status == "pass" and (c.name in ("model.compile", "model.output") or c.name == "data.fields" and trainer.adapter.dropped):
                console.print(f"note: {c.message}")  # said once at start: what was left out, that compiling worked
            if c.name == "model.batch_coupling":
                oom.batch_coupling = c  # said only when a step runs more than one micro-batch: now, or after a split
            elif c.status == "warn":
                console.print(f"[yellow]preflight[/yellow]: {c.message}" + (f" (hint: {c.hint})" if c.hint else ""))
                log.event(trainer.state.step, "preflight", c.message, check=c.name)
        require(checks)
        if oom.batch_coupling is None:  # one micro-batch per step: checked at the first OOM split, if one comes
            oom.batch_coupling = lambda: batch_coupling(trainer, trainer.batch, trainer.micro_batch_size)
        oom.warn_batch_coupled(trainer, trainer.state.step)
    except BaseException:  # a run that stops before its first step: the loggers' runs are ended too
        stall.close()
        if sinks is not None:
            sinks.close()
        raise


def check_config(config: str | Path, overrides: list[str] | None = None, *, profile: str | None = None,
                 world: int = 1) -> None:
    """Resolve ``config`` as :func:`train` will, for ``world`` processes; raises ConfigError if it is bad."""
    cfg, _, _ = resolve_config(Path(config), profile=profile, overrides=overrides)
    check_world_batch(cfg, world)


def train(config: str | Path | dict | Config, overrides: list[str] | None = None, *, profile: str | None = None,
          run_dir: str | Path | None = None, resume: str = "auto", hooks: Iterable[Hook] = (),
          memory_budget: str | int | None = None, started: float | None = None) -> dict:
    """Train from a config and return the run summary (the content of ``summary.json``).

    Args:
        config: a YAML path, a config mapping, or a :class:`Config`.
        overrides: ``--set`` style ``"section.key=value"`` strings.
        profile: hardware profile name or path (overrides ``hardware:``).
        run_dir: where logs and checkpoints go (default ``runs/<config stem>``).
        resume: ``auto`` (newest valid checkpoint in run_dir), ``never``, or a checkpoint path.
        hooks: extra :class:`~trainguard.Hook` objects.
        memory_budget: cap the device memory (``"3.5GiB"`` or bytes); simulated on a CPU.
        started: when the command began (``time.time()``), for ``startup_s``; default: now.

    Raises:
        ConfigError: bad config or usage (nothing trained).
        RunFailed: training gave up; the summary is written first.
    """
    started = started or time.time()
    budget = parse_size(memory_budget) if isinstance(memory_budget, str) else memory_budget
    if isinstance(config, Config):
        config = config.model_dump(mode="json", exclude_defaults=True)
    path = None if isinstance(config, dict) else Path(config)
    cfg, prof, why = resolve_config(path, profile=profile, overrides=overrides, raw=config if isinstance(config, dict) else None)
    rd = Path(run_dir) if run_dir is not None else default_run_dir(path)
    ended = False
    try:
        if not distributed.current().is_main:  # rank 0 holds the run directory for the whole job
            summary = _train(cfg, prof, why, rd, resume, hooks, budget, started)
        else:
            with run_lock.hold(rd):  # one writer per run directory (exit 2 if another process holds it)
                summary = _train(cfg, prof, why, rd, resume, hooks, budget, started)
        ended = True
        return summary
    except RunFailed as e:
        ended = getattr(e, "after_fit", False)  # a guard's stop: every rank stopped at the same step
        raise
    finally:
        distributed.shutdown(together=ended)


def _train(cfg: Config, prof, why: str, rd: Path, resume: str, hooks: Iterable[Hook], budget: int | None,
           started: float) -> dict:
    try:
        trainer = build_trainer(cfg, prof, why, run_dir=rd, resume=resume, extra_hooks=hooks, memory_budget=budget,
                                started=started)
    except RunComplete as done:  # a re-run of a completed run: its directory is left exactly as it is
        s = done.summary
        if distributed.current().is_main:
            console.print(f"{rd} is complete (step {s['steps']} of {done.max_steps}, {fmt_duration(s.get('wall_s') or 0)}); "
                          "nothing to do. To train further: raise train.max_steps (resumes) or use --resume never / "
                          "another --run-dir")
        return s
    except Exception as e:  # summary.json is written at every end, a failed setup included
        if not distributed.current().is_main:
            raise
        try:  # an earlier record here is kept: a failed attempt never replaces a completed run's summary
            rd.mkdir(parents=True, exist_ok=True)
            write_json_atomic(rd / "summary.json", after_failed_setup(
                read_summary(rd / "summary.json"), profile=prof.name,
                error=getattr(e, "message", None) or f"{type(e).__name__}: {e}", exit_code=getattr(e, "exit_code", 1)))
        except OSError as io:  # the run directory itself is the problem (a file, read-only, full): the error says so
            console.print(f"[yellow]warning[/yellow]: could not write {rd / 'summary.json'}: {io}")
        raise
    try:
        trainer.fit()
    except Exception as e:
        if trainer.strategy.sharded and not isinstance(e, JobRestart) and restart_pending(rd):
            # a collective failed because another rank left the job out of memory: that rank says why
            restart = JobRestart("another rank left the job out of memory; the job restarts")
            restart.quiet = True
            raise restart from None
        if not isinstance(e, torch.OutOfMemoryError):
            raise
        # outside the forward/backward (optimizer step, evaluation)
        raise RunFailed(f"out of device memory at step {trainer.state.step + 1} with micro-batch {trainer.micro_batch_size}, "
                        "outside the forward/backward", "lower train.micro_batch_size (accumulation keeps the effective batch); "
                        "re-running resumes from the last checkpoint") from None
    finally:
        if trainer.memory is not None:
            trainer.memory.stop()
    summary = next(h for h in trainer.hooks if isinstance(h, SummaryWriter)).summary
    if trainer.state.status == "failed":
        failed = RunFailed(trainer.state.error or "training failed", trainer.state.hint or "see events.jsonl in the run directory")
        failed.after_fit = True  # every rank of a process group ends here at the same step
        failed.quiet = not trainer.world.is_main  # the same decision on every rank: rank 0 says it
        raise failed
    return summary
