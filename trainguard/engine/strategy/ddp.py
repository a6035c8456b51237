"""``train.strategy: ddp``: a replica of the model on every rank, gradients averaged after the step's
exchange, in place in flat buckets.

Not torch's ``DistributedDataParallel``: DDP reduces gradients from inside the backward, so a rank that
runs out of memory mid-step leaves the others waiting in its reducer. Here every rank computes its
gradients locally, the ranks agree on the step (one small ``all_reduce``), and only then are the
gradients averaged (:class:`trainguard.distributed.GradViews`). See docs/distributed.md.
"""

from __future__ import annotations

import torch

from trainguard import distributed
from trainguard.engine.grads import total_norm
from trainguard.engine.strategy.base import InGroup, micro_batches


class Replicated(InGroup):
    name = "ddp"
    defers = True  # every rank reads the same sums at the same point, and redoes a bad step with the others

    def prepare(self, model, device) -> None:
        distributed.broadcast_tensors([t.detach() for t in (*model.parameters(), *model.buffers())])  # rank 0's weights

    def bind(self, trainer) -> None:
        super().bind(trainer)
        self.views = distributed.GradViews(trainer.params)

    def accumulate(self, trainer, batch) -> torch.Tensor:
        self.views.prepare()  # zeroed bucket views as the gradients: the backward accumulates into them
        return micro_batches(trainer, batch)

    def local_norm(self, trainer) -> torch.Tensor:
        return total_norm(trainer.params).float()

    def present(self, trainer) -> list[bool]:
        return self.views.present(trainer.params)  # every gradient exists as a view: the backward's hooks tell

    def reduce_gradients(self, trainer, batch, agreed) -> None:
        self.views.reduce(len(batch) / agreed.samples if agreed.samples else 0.0, agreed.present, trainer.params)
