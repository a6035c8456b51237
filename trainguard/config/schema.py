"""The typed configuration: one pydantic model per section, nested in one root ``Config``.

Every field has a default and a one-line description; ``docs/config.md`` is generated from
these descriptions (``python scripts/gen_config_reference.py``). YAML keys are field names.
Unknown keys are rejected (``extra="forbid"``). This module must not import torch: it is
used by ``trainguard --help`` and ``trainguard profiles``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Target = dict[str, Any]
"""A component spec: a mapping with ``_target_: "pkg.mod:attr"`` plus keyword arguments."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_target(v: Target | None, where: str) -> Target | None:
    if v is not None and "_target_" not in v:
        raise ValueError(f"{where} needs a `_target_: package.module:attr` entry")
    return v


class DataConfig(Section):
    """Datasets and how they are loaded."""

    train: Target | None = Field(None, description="Training dataset: `{_target_: pkg.mod:fn, ...}` returning a torch Dataset (map-style or iterable).")
    val: Target | None = Field(None, description="Optional validation dataset, same form as `train`.")
    fields: dict[str, str] = Field(default_factory=dict, description="Renames dataset fields to forward() arguments, e.g. `{label: labels}`; a list passes fields under their own names. The model gets only the fields its forward() names, plus those named here (through `**kwargs` if it has it).")
    num_workers: Union[int, Literal["auto"]] = Field("auto", description="DataLoader worker processes; `auto` picks from the CPU count and the hardware profile.")
    pin_memory: Union[bool, Literal["auto"]] = Field("auto", description="Pin host memory for faster host-to-device copies; `auto` = on for CUDA.")
    shuffle: bool = Field(True, description="Reshuffle the training set every epoch (deterministically from `seed`).")
    item_seeding: Literal["auto", "always"] = Field("auto", description="Seeding of the python/numpy/torch RNGs around each item's `__getitem__`, so random augmentation is the same with 0 or N workers and after resume. `auto`: only once an item is seen to draw from them (checked per batch; the items are the same as with `always`); `always`: every item, from the start.")

    @field_validator("train", "val")
    @classmethod
    def _targets(cls, v, info):
        return _check_target(v, f"data.{info.field_name}")

    @field_validator("fields", mode="before")
    @classmethod
    def _field_list(cls, v):
        return {f: f for f in v} if isinstance(v, list) else v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("num_workers must be >= 0 or `auto`")
        return v


class OptimConfig(Section):
    """The optimizer."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: `adamw` (decoupled weight decay) or `sgd` (with momentum).")
    lr: float = Field(3.0e-4, gt=0, description="Peak learning rate, reached at the end of warmup.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay; applied to parameters with 2 or more dimensions only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    fused: bool | Literal["auto"] = Field("auto", description="torch's fused optimizer kernel (one kernel for all parameters instead of a few per tensor; no host sync for fp16's skipped steps). `auto` = fused where torch has it for the parameters' device (CUDA, CPU, MPS); `false` = torch's default implementation.")


class ScheduleConfig(Section):
    """The learning-rate schedule, evaluated per optimizer step."""

    name: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup: `cosine`, `linear` or `constant`.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to `optim.lr` over this many optimizer steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Floor of the decay, as a fraction of `optim.lr`.")


class TrainConfig(Section):
    """The training loop."""

    max_steps: int = Field(1000, gt=0, description="Number of optimizer steps to train for.")
    epochs: float | None = Field(None, gt=0, description="Train for this many passes over `data.train` instead of naming `max_steps`: max_steps = ceil(epochs x batches per epoch), where an epoch is the dataset length // batch_size batches (the last partial batch is not used). Map-style datasets only.")
    batch_size: int = Field(32, gt=0, description="Effective samples per optimizer step, all ranks together.")
    micro_batch_size: Union[int, Literal["auto"]] = Field("auto", description="Samples per forward/backward; `auto` = the largest that fits on a CUDA device or under --memory-budget (searched once, then cached; under `train.strategy: fsdp` forecast on fake tensors instead), else the whole batch (with N processes, each one's share of it). Accumulation = batch_size / (micro_batch_size * N processes).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="Autocast precision; `auto` takes the hardware profile's default, falling back to what the device supports.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the total gradient norm to this value; 0 disables clipping.")
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl line every N optimizer steps (and at the first and last step).")
    eval_every: int = Field(0, ge=0, description="Evaluate on `data.val` every N optimizer steps; 0 = never.")
    eval_batches: int = Field(0, ge=0, description="Limit each evaluation to this many batches; 0 = the whole validation set.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device to train on; `auto` = CUDA, then MPS, then CPU.")
    tf32: bool = Field(False, description="Allow TF32 matmuls on Ampere and newer GPUs (set by the hardware profile).")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="With several processes: `ddp` replicates the model on every rank; `fsdp` shards parameters, gradients and optimizer state over the ranks (FSDP2, `fully_shard`).")
    compile: bool = Field(False, description="Wrap the model in torch.compile (set by the hardware profile; ignored on a device the profile is not for). Under `train.strategy: fsdp`, each block's forward is compiled instead. If compiling fails, the run says why and trains the eager model.")

    @field_validator("micro_batch_size")
    @classmethod
    def _mbs(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("micro_batch_size must be > 0 or `auto`")
        return v

    @model_validator(mode="after")
    def _divides(self):
        if isinstance(self.micro_batch_size, int) and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; accumulation must be a whole number of micro-batches"
            )
        return self


class GuardConfig(Section):
    """What the guards do when a sample or a step goes bad (see docs/guards.md)."""

    on_nonfinite: Literal["skip", "rollback", "stop"] = Field("skip", description="A step whose loss or gradient norm is NaN/inf: `skip` its update, `rollback` to the last good checkpoint when bad steps repeat, or `stop`.")
    max_skip_fraction: float = Field(0.05, ge=0, le=1, description="Largest fraction of the planned samples (max_steps x batch_size) that may be skipped; past it the run stops (failed).")
    max_consecutive_bad_steps: int = Field(10, gt=0, description="Stop after this many bad (skipped) steps in a row.")
    rollback_after: int = Field(3, gt=0, description="With `rollback`: roll back after this many bad steps in a row (or at once if parameters are non-finite).")
    max_rollbacks: int = Field(3, ge=0, description="With `rollback`: stop (failed) after this many rollbacks.")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="With `rollback`: multiply the learning rate by this after each rollback.")
    spike_factor: float = Field(0.0, ge=0, description="Treat a finite loss above this multiple of the running median as a bad step; 0 = off.")
    spike_window: int = Field(50, ge=5, description="Number of recent finite losses in the running median for spike detection.")
    remember_bad_samples: bool = Field(True, description="A sample the guard dropped to heal a non-finite step is left out of later batches before the forward (recorded, and counted in the skip budget), instead of making a step bad and being found again each epoch. Map-style datasets only; off: every occurrence is found anew.")
    on_oom: Literal["split", "stop"] = Field("split", description="Out of device memory in a step: `split` redoes it with half the micro-batch (twice the accumulation, same effective batch) and keeps that size; `stop` ends the run before the step.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.on_nonfinite == "rollback" and self.rollback_after > self.max_consecutive_bad_steps:
            raise ValueError(f"rollback_after ({self.rollback_after}) must be <= max_consecutive_bad_steps "
                             f"({self.max_consecutive_bad_steps}), or the run stops before it can roll back")
        return self


class CheckpointConfig(Section):
    """Checkpoints in `<run_dir>/checkpoints/`."""

    every_steps: int = Field(100, ge=0, description="Save a checkpoint every N optimizer steps (0 = only at the end). A completed run always saves its last step.")
    keep_last: int = Field(3, gt=0, description="Keep the newest N checkpoints (plus the best one, if `best_metric` is set).")
    best_metric: str | None = Field(None, description="Keep the checkpoint with the best value of this validation metric (e.g. `loss`, `accuracy`); `summary.json`'s `best` names it.")
    best_mode: Literal["auto", "min", "max"] = Field("auto", description="Whether lower or higher `best_metric` is better. `auto`: higher for accuracy-like names (containing acc, f1, auc, precision, recall, bleu, rouge, map, iou, dice or score), lower otherwise (loss, perplexity, error, ...).")


class LogConfig(Section):
    """Console and metrics logging."""

    progress: Union[bool, Literal["auto"]] = Field("auto", description="Show a progress bar; `auto` = when stderr is a terminal.")
    tensorboard: bool = Field(False, description="Also write to `<run_dir>/tb` for TensorBoard: the train and val scalars, and the guard events (skips, OOM splits, rollbacks, stops) as text and running counts under `guard/` (needs the `tensorboard` extra).")


class MemoryConfig(Section):
    """Device memory limits."""

    headroom: float = Field(0.1, ge=0, lt=1, description="Fraction of device memory (or of --memory-budget) the micro-batch search keeps free (set by the hardware profile).")


class Config(Section):
    """The root config. Precedence: defaults < hardware profile < YAML (with `extends:`) < `--set`."""

    hardware: str = Field("auto", description="Hardware profile: a name from `trainguard profiles`, a path to a profile YAML, or `auto`.")
    seed: int = Field(0, description="Seed for model init, data order and dropout; the same seed gives the same run.")
    model: Target | None = Field(None, description="The model: `{_target_: pkg.mod:fn, ...}` returning an nn.Module.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and loading.")
    loss: Target | None = Field(None, description="Optional loss `{_target_: ...}` called as `loss(output, target)`; without it the model's output is the loss.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="The optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="The learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Guards against bad samples and bad steps.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Device memory.")
    hooks: list[Target] = Field(default_factory=list, description="User hooks: a list of `{_target_: ...}` returning `trainguard.Hook` objects.")

    @field_validator("model", "loss")
    @classmethod
    def _targets(cls, v, info):
        return _check_target(v, info.field_name)

    @field_validator("hooks")
    @classmethod
    def _hook_targets(cls, v):
        for i, h in enumerate(v):
            _check_target(h, f"hooks[{i}]")
        return v
