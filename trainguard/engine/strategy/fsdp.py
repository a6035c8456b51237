"""``train.strategy: fsdp``: FSDP2 (``fully_shard``) over the ranks: parameters, gradients and
optimizer state sharded, gathered one block at a time.

Every forward and backward is a sequence of collectives, so every rank runs as many micro-batches as a
full share of the batch needs (stand-ins, weighted 0, where samples failed to load on this rank only);
FSDP reduces the gradients in the backward, so the exchange's verdict is by loss, and a rank that ran
out of memory cannot take part in it (OomRecovery takes it out of the job). The optimizer is
checkpointed as per-rank shards. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib

import torch

from trainguard import distributed
from trainguard.engine.batch import slice_batch, split_batch, to_device
from trainguard.engine.grads import local_norm
from trainguard.engine.precision import autocast
from trainguard.engine.state import preserved_state
from trainguard.engine.strategy.base import InGroup
from trainguard.errors import RunFailed


class Sharded(InGroup):
    name = "fsdp"
    sharded = True
    by_loss_only = True  # the gradients were reduced in the backward: one rank's NaN is in every rank's shards

    def build_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # built whole on the host; FSDP2 moves it to the device block by block

    def prepare(self, model, device) -> None:
        """Shard the model (a rank's device holds its shards and at most one block whole, never the whole
        model), then scatter rank 0's weights into every rank's shards."""
        whole = model.state_dict() if self.world.is_main else {}
        distributed.shard(model, device)
        distributed.load_model_state(model, whole, from_rank0=True)

    def forward_module(self, model, compile: bool):
        return distributed.CompiledBlocks(model) if compile else model  # compiled block by block, as torchtitan does

    def accumulate(self, trainer, batch) -> torch.Tensor:
        """Each micro-batch's loss is weighted by its sample count, not its share: FSDP averages the
        reduced gradients over ranks, and :meth:`reduce_gradients` then scales them by ranks / samples of
        all ranks, so the gradient is the mean over every sample present, as under ddp and in one process,
        also when ranks hold different numbers of samples. A stand-in is one sample of this rank's, its
        RNG draws and buffer updates undone."""
        n = len(batch)
        parts = split_batch(batch.data, trainer.micro_batch_size) if n else []
        if n:
            self.spare = slice_batch(batch.data, 0, 1)
        need = trainer.grad_accum  # micro-batches of a full share
        if len(parts) < need and self.spare is None:
            raise RunFailed("train.strategy: fsdp: every sample of this rank's first batch failed to load, and a "
                            "sharded step needs one to take part in the other ranks' forwards",
                            "fix the data (events.jsonl names the samples), or use train.strategy: ddp")
        parts += [(self.spare, 0)] * (need - len(parts))
        total = torch.zeros((), device=trainer.device)
        for micro, k in parts:
            micro = to_device(micro, trainer.device, non_blocking=True)
            with preserved_state(trainer.model) if k == 0 else contextlib.nullcontext(), \
                    autocast(trainer.device.type, trainer.precision):
                _, loss, _ = trainer.adapter(micro)
            trainer.scaler.scale(loss * k).backward()
            total += loss.detach().float() * (k / n if n else 0.0)
        return total if n else torch.full((), float("nan"), device=trainer.device)

    def agree(self, trainer, batch, loss, oom):
        if oom is not None:  # the others may be inside the forward's collectives: this rank does not enter the exchange
            return loss, oom
        return super().agree(trainer, batch, loss, oom)

    def local_norm(self, trainer) -> torch.Tensor:
        return local_norm(trainer.params)

    def reduce_gradients(self, trainer, batch, agreed) -> None:
        if agreed.samples:  # FSDP's mean over ranks of per-sample sums -> the mean over samples
            with torch.no_grad():
                torch._foreach_mul_([p.grad.to_local() for p in trainer.params if p.grad is not None],
                                    self.world.size / agreed.samples)

    def end_forwards(self, model) -> None:
        distributed.reshard(model)  # forwards without a backward leave FSDP's root gathered whole

    def model_state(self, model) -> dict:
        return distributed.model_state(model)  # gathered whole to rank 0, every rank taking part

    def load_model_state(self, model, state: dict) -> None:
        distributed.load_model_state(model, state)

    def optimizer_state(self, model, optimizer):
        return None  # in the checkpoint's shards

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        distributed.load_optimizer_state(model, optimizer, state)  # a whole state (checkpoints from before the shards)

    def optimizer_shards(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"optimizer": get_optimizer_state_dict(model, optimizer)}

    def load_optimizer_shards(self, model, optimizer, state: dict) -> None:
        distributed.set_sharded_optimizer_state(model, optimizer, state["optimizer"], full=False)
