"""The typed configuration: one pydantic model per section, nested in one root ``Config``.

Every field has a default and a one-line description; ``docs/config.md`` is generated from
these descriptions (``python scripts/gen_config_reference.py``). YAML keys are field names.
Unknown keys are rejected (``extra="forbid"``). This module must not import torch: it is
used by ``trainguard --help`` and ``trainguard profiles``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_serializer, model_validator

from trainguard.errors import ConfigError

Target = dict[str, Any]
"""A component spec: a mapping with ``_target_: "pkg.mod:attr"`` plus keyword arguments."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment,
    and no number is inf or NaN (``.inf`` means nothing for a learning rate, a fraction or a size)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_target(v: Target | None, where: str) -> Target | None:
    if v is not None and "_target_" not in v:
        raise ValueError(f"{where} needs a `_target_: package.module:attr` entry")
    return v


class DataConfig(Section):
    """Datasets and how they are loaded."""

    train: Target | None = Field(None, description="Training dataset: `{_target_: pkg.mod:fn, ...}` returning a torch Dataset (map-style or iterable).")
    val: Target | None = Field(None, description="Optional validation dataset, same form as `train`.")
    collate_fn: Target | None = Field(None, description="Optional collator `{_target_: ...}` (nested `_target_` values, e.g. a tokenizer, built first), built once and called with the list of samples like `DataLoader(collate_fn=...)`, in the loader workers; e.g. `transformers.DataCollatorWithPadding` for dynamic padding. A sample it raises on is skipped and recorded.")
    filter_fields: bool = Field(True, description="With `collate_fn`: dict samples reach it with only the fields the model gets (forward()'s names after `data.fields`, plus label/label_ids/targets), as Hugging Face's Trainer removes unused columns before its collator; `false`: every field, for a collator that reads raw ones (tokenizes `text`, processes `image`).")
    fields: dict[str, str] = Field(default_factory=dict, description="Renames dataset fields to forward() arguments, e.g. `{label: labels}`; a list passes fields under their own names. The model gets only the fields its forward() names, plus those named here (through `**kwargs` if it has it).")
    num_workers: Union[int, Literal["auto"]] = Field("auto", description="DataLoader worker processes; `auto` picks from the CPU count and the hardware profile.")
    pin_memory: Union[bool, Literal["auto"]] = Field("auto", description="Pin host memory for faster host-to-device copies; `auto` = on for CUDA.")
    shuffle: bool = Field(True, description="Reshuffle the training set every epoch (deterministically from `seed`).")
    item_seeding: Literal["auto", "always"] = Field("auto", description="Seeding of the python/numpy/torch RNGs around each item's `__getitem__`, so random augmentation is the same with 0 or N workers and after resume. `auto`: only once an item is seen to draw from them (checked per batch; the items are the same as with `always`); `always`: every item, from the start.")
    stream_split: Literal["auto", "dataset"] = Field("auto", description="How a stream (IterableDataset) is split over ranks and loader workers: `auto`: a `datasets` stream by its shards (split_dataset_by_node, then per worker), any other: part `rank * workers + worker` of `ranks * workers` takes every that-many-th item; `dataset`: the dataset splits itself (get_worker_info and its rank), trainguard only numbers its items.")

    @field_validator("train", "val", "collate_fn")
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


class BuiltinOrTarget(Section):
    """A section that is either trainguard's built-in choice (its fields, checked as usual) or the
    user's own callable: ``_target_`` plus that callable's own keys, passed to it as they are
    (nested ``_target_`` values built first), beside the fields in ``SHARED`` (trainguard's own in
    both modes). The resolved config writes it back the same way, so it round-trips."""

    SHARED: ClassVar[tuple[str, ...]] = ()
    WHAT: ClassVar[str] = ""
    _target: str | None = PrivateAttr(None)
    _kwargs: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def target(self) -> str | None:
        """The user's callable (``_target_``), or None for the built-in choice."""
        return self._target

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keys given beside ``_target_`` (not trainguard's), as written."""
        return self._kwargs

    @model_validator(mode="wrap")
    @classmethod
    def _split_target(cls, data: Any, handler):
        if not isinstance(data, dict) or "_target_" not in data:
            return handler(data)
        where = cls.__name__.removesuffix("Config").lower()
        if "name" in data:
            raise ConfigError(f"`{where}.name` ({data['name']}) and `{where}._target_` ({data['_target_']}) are both set",
                              f"keep one: `{where}.name` picks a built-in {cls.WHAT}, `{where}._target_` your own; "
                              "remove the other from the YAML (or from the file it extends)")
        if not isinstance(data["_target_"], str):
            raise ValueError("`_target_` must be a string: package.module:attr")
        obj = handler({k: v for k, v in data.items() if k in cls.SHARED})
        obj._target = data["_target_"]
        obj._kwargs = {k: v for k, v in data.items() if k != "_target_" and k not in cls.SHARED}
        return obj

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self._target is None:
            return data
        return {"_target_": self._target, **self._kwargs, **{k: data[k] for k in self.SHARED if k in data}}


class OptimConfig(BuiltinOrTarget):
    """The optimizer: `name: adamw|sgd` with the keys below, or your own, `{_target_: torch.optim.RMSprop, lr: 1.0e-3, ...}`:
    any callable, called with the parameter groups first and the other keys as keyword arguments
    (nested `_target_` values built first). The groups keep the weight-decay rule (`weight_decay` on
    tensors with 2+ dims only) when the callable takes `weight_decay`; `fused` is trainguard's key in
    both forms (passed as `fused=` only to a callable that takes it); `name` and `_target_` together are an error."""

    SHARED: ClassVar[tuple[str, ...]] = ("fused",)
    WHAT: ClassVar[str] = "optimizer"

    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: `adamw` (decoupled weight decay) or `sgd` (with momentum).")
    lr: float = Field(3.0e-4, gt=0, description="Peak learning rate, reached at the end of warmup.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay; applied to parameters with 2 or more dimensions only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    fused: bool | Literal["auto"] = Field("auto", description="torch's fused optimizer kernel (one kernel for all parameters instead of a few per tensor; no host sync for fp16's skipped steps). `auto` = fused where torch has it for the parameters' device (CUDA, CPU, MPS); `false` = torch's default implementation.")


class ScheduleConfig(BuiltinOrTarget):
    """The learning-rate schedule, evaluated per optimizer step: `name` with the keys below, or your
    own, `{_target_: transformers.get_cosine_schedule_with_warmup, num_warmup_steps: 100}`: any
    callable, called with the optimizer first and the other keys (a `num_training_steps` or
    `total_steps` it takes and is not given is `train.max_steps`); it must return an object whose
    `step()` takes no argument. It is stepped once per optimizer step (not on skipped steps) and
    checkpointed through its `state_dict()`. `name` and `_target_` together are an error."""

    WHAT: ClassVar[str] = "schedule"

    name: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup: `cosine`, `linear` or `constant`.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to `optim.lr` over this many optimizer steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Floor of the decay, as a fraction of `optim.lr`.")


class TrainConfig(Section):
    """The training loop."""

    max_steps: int = Field(1000, gt=0, description="Number of optimizer steps to train for.")
    epochs: float | None = Field(None, gt=0, description="Train for this many passes over `data.train` instead of naming `max_steps`: max_steps = ceil(epochs x batches per epoch), where an epoch is the dataset length // batch_size batches (the last partial batch is not used). Map-style datasets only.")
    batch_size: int = Field(32, gt=0, description="Effective samples per optimizer step, all ranks together.")
    micro_batch_size: Union[int, Literal["auto"]] = Field("auto", description="Samples per forward/backward; `auto` = the largest that fits on a CUDA device or under --memory-budget (searched once, then cached; under `train.strategy: fsdp` forecast on fake tensors instead), else the whole batch (with N processes, each one's share of it). Each process's share (batch_size / N processes) is split into the fewest micro-batches of at most this many samples, within one sample of each other (batch_size 32, micro_batch_size 11: 11, 11, 10); the gradient is that of the whole batch (each micro-batch weighted by its samples).")
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


class GuardConfig(Section):
    """What the guards do when a sample or a step goes bad (see docs/guards.md)."""

    on_nonfinite: Literal["skip", "rollback", "stop"] = Field("skip", description="A step whose loss or gradient norm is NaN/inf: `skip` its update, `rollback` to the last good checkpoint when bad steps repeat, or `stop`.")
    max_skip_fraction: float = Field(0.05, ge=0, le=1, description="Largest fraction of the planned samples (max_steps x batch_size) that may be skipped; past it the run stops (failed).")
    max_consecutive_bad_steps: int = Field(10, gt=0, description="Stop after this many bad (skipped) steps in a row.")
    rollback_after: int = Field(3, gt=0, description="With `rollback`: roll back after this many bad steps in a row (or at once if parameters are non-finite).")
    max_rollbacks: int = Field(3, ge=0, description="With `rollback`: stop (failed) after this many rollbacks.")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="With `rollback`: multiply the learning rate by this after each rollback.")
    on_spike: Literal["off", "warn", "skip", "rollback"] = Field("warn", description="A finite loss spike (see `spike_factor`, `spike_zscore`): `warn` records a `spike` event and says so, training unchanged; `skip` skips the step, or redoes it without the samples whose own loss spikes; `rollback` skips, and rolls back like `on_nonfinite: rollback` when spikes repeat `rollback_after` steps in a row; `off`.")
    spike_factor: float = Field(3.0, ge=0, description="A spike is a loss above this multiple (>= 1) of the median of the last `spike_window` healthy steps' losses (and `spike_zscore` times their noise above it, on the log-loss).")
    spike_zscore: float = Field(6.0, gt=0, description="A spike's log-loss is more than this many times the window's noise above the median of its log-losses (the noise: 1.4826 x the median absolute step-to-step change of the log-loss, / sqrt(2): a robust standard deviation that a falling loss does not inflate).")
    spike_window: int = Field(100, ge=5, description="Number of recent healthy (finite, not spiking) losses the spike rule compares a step's loss with.")
    spike_warmup: int = Field(50, ge=5, description="Healthy steps in the window before the spike rule judges a step (the loss falls fastest at first); a smaller `spike_window` lowers it to the window's size.")
    remember_bad_samples: bool = Field(True, description="A sample the guard dropped to heal a non-finite step is left out of later batches before the forward (recorded, and counted in the skip budget), instead of making a step bad and being found again each epoch. Map-style datasets only; off: every occurrence is found anew.")
    on_oom: Literal["split", "stop"] = Field("split", description="Out of device memory in a step: `split` redoes it with half the micro-batch (twice the accumulation, same effective batch) and keeps that size; `stop` ends the run before the step.")
    stall_timeout: Union[Literal["auto"], float] = Field("auto", description="Seconds without progress that make a stall: a sample whose fetch hangs that long is skipped and recorded; a step, collective or evaluation batch that hangs stops the run, naming where (the preflight, the first step and checkpoint writes get 10 times as long). `auto`: 300 s or 10 times the slowest step so far, whichever is longer (30 minutes for the preflight, the first step and checkpoint writes).")

    @field_validator("stall_timeout")
    @classmethod
    def _stall(cls, v):
        if not isinstance(v, str) and not 0 < v < float("inf"):
            raise ValueError("stall_timeout must be a number of seconds > 0, or `auto`")
        return v

    _notes: list[str] = PrivateAttr(default_factory=list)  # deprecated spellings met, said once at start

    @field_validator("spike_factor")
    @classmethod
    def _spike_factor(cls, v, info):
        if info.data.get("on_spike", "off") != "off" and v < 1:
            raise ValueError("must be >= 1: a spike is a loss this many times the median; "
                             "to turn spike detection off, set guard.on_spike: off")
        return v

    @field_validator("spike_warmup")
    @classmethod
    def _spike_warmup(cls, v, info):
        window = info.data.get("spike_window")
        if window is not None and v > window:
            raise ValueError(f"must be <= spike_window ({window}), or the window never holds enough steps to judge one")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _spike_factor_alone(cls, data, handler):
        """The old spelling: `spike_factor` alone turned spike skipping on (0 = off). It still does, and says so."""
        note = None
        if isinstance(data, dict) and "spike_factor" in data and "on_spike" not in data:
            on = "skip" if data["spike_factor"] else "off"
            data = {**data, "on_spike": on}
            note = (f"guard.spike_factor: {data['spike_factor']} without guard.on_spike is deprecated (it meant "
                    f"on_spike: {on}): set guard.on_spike: {on} (off | warn | skip | rollback)")
        if isinstance(data, dict) and "spike_warmup" not in data and isinstance(data.get("spike_window"), int):
            data = {**data, "spike_warmup": max(5, min(data["spike_window"], cls.model_fields["spike_warmup"].default))}
        model = handler(data)
        if note:
            model._notes = [note]
        return model

    @model_validator(mode="after")
    def _consistent(self):
        if "rollback" in (self.on_nonfinite, self.on_spike) and self.rollback_after > self.max_consecutive_bad_steps:
            raise ValueError(f"rollback_after ({self.rollback_after}) must be <= max_consecutive_bad_steps "
                             f"({self.max_consecutive_bad_steps}), or the run stops before it can roll back")
        return self


class CheckpointConfig(Section):
    """Checkpoints in `<run_dir>/checkpoints/`."""

    every_steps: int = Field(100, ge=0, description="Save a checkpoint every N optimizer steps (0 = only at the end). A completed run always saves its last step.")
    every_minutes: float = Field(30.0, ge=0, allow_inf_nan=False, description="Also save a checkpoint when this many minutes of wall-clock time have passed since the last save, at the end of the step then running (0 = only by steps), so that a slow run loses at most this much work.")
    keep_last: int = Field(3, gt=0, description="Keep the newest N checkpoints (plus the best one, if `best_metric` is set).")
    best_metric: str | None = Field(None, description="Keep the checkpoint with the best value of this validation metric (e.g. `loss`, `accuracy`); `summary.json`'s `best` names it.")
    best_mode: Literal["auto", "min", "max"] = Field("auto", description="Whether lower or higher `best_metric` is better. `auto`: higher for accuracy-like names (containing acc, f1, auc, precision, recall, bleu, rouge, map, iou, dice or score), lower otherwise (loss, perplexity, error, ...).")
    safetensors: bool = Field(False, description="Also write the weights as `model.safetensors` in each checkpoint (in the manifest, verified like the rest; tied weights stored once, under their first name, as transformers does); needs the `safetensors` extra. See docs/your-model.md, \"Loggers and weights\".")


class MlflowConfig(Section):
    """An MLflow tracking server or store (`log.mlflow`)."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (`http://host:5000`, `databricks`, `file:./mlruns`); null = MLflow's default (`MLFLOW_TRACKING_URI`).")
    experiment: str = Field("trainguard", description="Experiment name; created if it does not exist.")
    run_name: str | None = Field(None, description="The MLflow run's name; null = the run directory's name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the MLflow run.")


class LogConfig(Section):
    """Console and metrics logging."""

    progress: Union[bool, Literal["auto"]] = Field("auto", description="Show a progress bar; `auto` = when stderr is a terminal.")
    tensorboard: bool = Field(False, description="Also write to `<run_dir>/tb` for TensorBoard: the train and val scalars, and the guard events (skips, OOM splits, rollbacks, stops) as text and running counts under `guard/` (needs the `tensorboard` extra).")
    wandb: dict[str, Any] | None = Field(None, description="Also log to Weights & Biases what TensorBoard gets: `{project: ..., mode: online (or offline), ...}`, every key passed to `wandb.init` (unknown ones are config errors); `dir` defaults to the run directory (unless `WANDB_DIR` is set), `name` to its name, `config` to the resolved config. Rank 0 only; needs the `wandb` extra. A failure while logging warns once and the run goes on without it.")
    mlflow: MlflowConfig | None = Field(None, description="Also log to MLflow what TensorBoard gets: `{tracking_uri: ..., experiment: ..., run_name: ..., tags: {...}}` (the `mlflow` extra, the skinny client, is enough). Rank 0 only. A server that cannot be reached warns once and the run goes on without it.")

    @field_validator("wandb")
    @classmethod
    def _wandb(cls, v):
        if v is not None and v.get("mode", "online") not in ("online", "offline", "disabled"):
            raise ValueError(f"log.wandb.mode must be online, offline or disabled, not {v['mode']!r}")
        return v


class MemoryConfig(Section):
    """Device memory limits."""

    headroom: float = Field(0.1, ge=0, lt=1, description="Fraction of device memory (or of --memory-budget) the micro-batch search keeps free (set by the hardware profile).")


class Config(Section):
    """The root config. Precedence: defaults < hardware profile < YAML (with `extends:`) < `--set`."""

    hardware: str = Field("auto", description="Hardware profile: a name from `trainguard profiles`, a path to a profile YAML, or `auto`.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for model init, data order and dropout, from 0 to 2**32 - 1 (numpy's range); the same seed gives the same run.")
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
