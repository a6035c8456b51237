"""`trainguard diagnose`: every reason a run would fail or waste the hardware, found in seconds.

:func:`diagnose` returns a :class:`Report` of :class:`~trainguard.guards.preflight.Check` s,
named ``section.what`` and reported in section order:

* ``env.*``: Python, torch and its build, NumPy interop, packages, the CUDA stack, harmful
  environment variables (:mod:`~trainguard.diagnose.environment`);
* ``hardware.*``: the device, its memory and precisions, CPU and RAM against the loader workers,
  disk for checkpoints, shared memory for workers;
* ``config.*``: it validates, the profile matches the device, the batch divides;
* ``data.*``, ``model.*``, ``memory.*``: the run built exactly as train builds it, one
  forward/backward through the shared preflight, and the memory forecast
  (:mod:`~trainguard.diagnose.dry_run`).

Without a config only ``env`` and ``hardware`` are checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainguard.guards.preflight import Check

SECTIONS = ("env", "hardware", "config", "data", "model", "memory")


@dataclass
class Report:
    """The checks, in section order; ``exit_code`` 0 (no failure), 1 (a check failed) or 2 (the
    config could not be read: nothing beyond the environment was checked)."""

    checks: list[Check] = field(default_factory=list)
    config_error: bool = False

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 2 if self.config_error else 0 if self.ok else 1

    def as_json(self) -> dict:
        """The CONTRACT's ``diagnose --json`` object."""
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)
        order = {s: i for i, s in enumerate(SECTIONS)}
        self.checks.sort(key=lambda c: order.get(c.name.split(".")[0], len(SECTIONS)))  # stable within a section


def diagnose(config: str | Path | None = None, *, profile: str | None = None, overrides: list[str] | None = None,
             memory_budget: int | None = None, run_dir: Path | None = None,
             say: Callable[[str], None] = lambda _: None) -> Report:
    """Check the environment and hardware, and with ``config`` the config, data, model and memory,
    building the run as ``trainguard train`` would (nothing is trained, nothing written but the
    autoconfig cache). ``say`` receives what is being checked, for a progress line."""
    from trainguard.diagnose.environment import cpu_check, device_checks, disk_check, environment_checks, precision_check, shm_check
    from trainguard.errors import ConfigError
    from trainguard.hardware.probe import probe
    from trainguard.hardware.profiles import choose_profile, match_profile

    report = Report()
    say("environment")
    report.add(*environment_checks())
    if config is None:
        say("hardware")
        info = probe()
        try:
            prof, why = choose_profile(profile) if profile else match_profile(info)
        except ConfigError as e:
            report.add(Check("config.profile", "fail", e.message, e.hint))
            report.config_error = True
            return report
        workers = max(0, min(prof.num_workers, info.cpu_count - 1))
        report.add(*device_checks(info), profile_check(prof, why, info, "hardware.profile"),
                   precision_check(prof.precision if prof.device == info.type else "auto", info, prof, prof.tf32),
                   cpu_check(info, None), disk_check(run_dir or Path("runs"), None, 0), shm_check(workers, None))
        return report

    from trainguard.config.load import resolve_config

    say("config")
    try:
        cfg, prof, why = resolve_config(config, profile=profile, overrides=overrides)
    except ConfigError as e:
        report.add(Check("config.valid", "fail", e.message, e.hint))
        report.config_error = True
        cfg = None
    from trainguard import distributed

    if distributed.current().size > 1:  # under torchrun: every rank must agree before anything else
        checks = rank_checks(cfg, probe(cfg.train.device if cfg else "auto").type)
        report.add(*checks)
        agreed = all(c.status == "pass" for c in checks)  # the same config on every rank: the same path below
        if not (agreed and cfg is not None and cfg.train.strategy == "fsdp"):
            distributed.shutdown()  # the rest is checked by each rank alone
    if cfg is None:
        return report
    try:  # fsdp keeps the group: the model is sharded and stepped in it, as train does
        return _checks(report, cfg, prof, why, config, memory_budget, run_dir, say)
    finally:
        distributed.shutdown()


def _checks(report: Report, cfg, prof, why: str, config, memory_budget, run_dir, say) -> Report:
    """The config's checks after it resolved (on every rank, under torchrun)."""
    from trainguard.diagnose.environment import device_checks, precision_check
    from trainguard.hardware.probe import probe
    from trainguard.run_dir import default_run_dir

    report.add(Check("config.valid", "pass", f"{config}: valid"))
    info = probe(cfg.train.device)
    report.add(*device_checks(info))
    report.add(profile_check(prof, why, info))
    precision = precision_check(cfg.train.precision, info, prof, cfg.train.tf32)
    report.add(precision)
    report.add(batch_check(cfg))
    if cfg.train.device in ("cuda", "mps") and info.type != cfg.train.device:
        report.add(Check("hardware.device", "fail", f"train.device is {cfg.train.device} but no {cfg.train.device} device is available",
                         "set train.device: auto (or cpu)"))
        return report
    if precision.status == "fail" and prof.device == info.type:
        return report  # train would refuse to start here: nothing more can be run
    from trainguard.diagnose.dry_run import dry_run

    report.add(*dry_run(cfg, prof, info, memory_budget=memory_budget,
                        run_dir=run_dir or default_run_dir(config), say=say))
    return report


def profile_check(prof, why: str, info, name: str = "config.profile") -> Check:
    """The profile (the config's, or --profile) against the device in hand."""
    from trainguard.memory.autoconfig import card_here

    if card_here(prof, info):
        return Check(name, "pass", f"profile {prof.name} ({why}) matches {info.name}")
    from trainguard.hardware.profiles import match_profile

    mine = match_profile(info)[0].name
    msg = f"profile {prof.name} is for {prof.description}; this machine has {info.name} (profile {mine})"
    if name == "config.profile":
        msg += f": the data and model checks run here on a few samples; memory is forecast for {prof.name}"
    return Check(name, "warn", msg, f"set hardware: auto (or --profile {mine}) for this machine; keep {prof.name} for its card")


def rank_checks(cfg, device_type: str) -> list[Check]:
    """Under torchrun: the process group initialises (NCCL on CUDA, gloo otherwise), every rank
    resolved the same config, and the global batch splits over the ranks."""
    import hashlib
    import json

    from trainguard import distributed

    world = distributed.current()
    try:
        distributed.init(device_type)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return [Check("env.distributed", "fail", f"rank {world.rank} of {world.size}: the process group did not "
                      f"initialise: {type(e).__name__}: {e}",
                      "check MASTER_ADDR/MASTER_PORT (or the rendezvous endpoint) and that every node reaches it")]
    backend = torch_backend()
    checks = [Check("env.distributed", "pass", f"{world.size} processes joined ({backend}); this is rank {world.rank}")]
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12] if cfg else "invalid"
    digests = distributed.gather_objects(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        checks.append(Check("config.ranks", "fail", f"ranks {differ} resolved a different config than rank 0 "
                            f"({', '.join(f'{r}: {d}' for r, d in enumerate(digests))})",
                            "give every node the same config file, --set overrides and profile (hardware: auto can "
                            "resolve differently on different machines)"))
    else:
        checks.append(Check("config.ranks", "pass", f"every rank resolved the same config ({digests[0]})"))
    return checks


def torch_backend() -> str:
    import torch

    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def batch_check(cfg) -> Check:
    from trainguard import distributed
    from trainguard.build import check_world_batch
    from trainguard.engine.batch import describe_split
    from trainguard.errors import ConfigError

    world = distributed.current().size
    if world > 1:
        try:
            check_world_batch(cfg, world)
        except ConfigError as e:
            return Check("config.batch", "fail", e.message, e.hint)
        bs, m = cfg.train.batch_size, cfg.train.micro_batch_size
        share = bs // world
        return Check("config.batch", "pass", f"batch_size {bs} = {world} processes x {share}"
                     + (f" ({describe_split(share, m)})" if m != "auto" else "; micro_batch_size auto"))
    bs, m = cfg.train.batch_size, cfg.train.micro_batch_size
    if m == "auto":
        return Check("config.batch", "pass", f"batch_size {bs}; micro_batch_size auto (see memory.fit): accumulation "
                     f"makes up the rest, the effective batch stays {bs}")
    return Check("config.batch", "pass", f"batch_size {bs} = {describe_split(bs, m)}")
