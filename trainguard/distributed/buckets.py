"""Gradients as views into flat buckets (DDP's ``gradient_as_bucket_view``): averaging them over ranks
copies nothing. Used by the ddp strategy (:mod:`trainguard.engine.strategy.ddp`)."""

from __future__ import annotations

import torch

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class GradViews:
    """Gradients as views into flat buckets, so averaging them over ranks copies nothing (DDP's
    ``gradient_as_bucket_view``). :meth:`prepare` gives every parameter a zeroed view as its
    gradient before a step's first backward, which accumulates into it in place; :meth:`reduce`
    scales and all-reduces each bucket as it is. Which parameters the backward reached is recorded
    by a hook (every gradient exists as a view, so ``grad is None`` no longer tells), and a
    parameter no rank reached gets its gradient back to ``None``, as in one process."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        self.touched = [False] * len(self.params)
        self.index = index = {id(p): i for i, p in enumerate(self.params)}
        self.buckets: list[tuple[torch.Tensor, list[int], list[torch.Tensor]]] = []
        for bucket in _buckets(self.params):
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            views, offset = [], 0
            for p in bucket:
                views.append(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            self.buckets.append((flat, [index[id(p)] for p in bucket], views))
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._touch(i))

    def _touch(self, i: int) -> None:
        self.touched[i] = True

    def prepare(self) -> None:
        """Zeroed views as the gradients, before a step's (or a retry's) first backward."""
        self.touched = [False] * len(self.params)
        for flat, members, views in self.buckets:
            flat.zero_()
            for i, v in zip(members, views):
                self.params[i].grad = v

    def present(self, params: list[torch.Tensor]) -> list[bool]:
        """Per parameter of ``params``: did this rank's backward reach it?"""
        return [id(p) in self.index and self.touched[self.index[id(p)]] for p in params]

    def reduce(self, weight: float, present: list[bool], params: list[torch.Tensor]) -> None:
        """Every gradient := the sum over ranks of ``weight`` x its local value. ``weight`` is this
        rank's share of the step's samples, so the result is the mean over all the samples of all
        ranks (ranks may hold fewer samples when some failed to load). ``present[i]``: some rank's
        backward reached ``params[i]`` (agreed beforehand); one that none reached keeps no gradient,
        so the optimizer leaves it alone, as in one process."""
        for flat, members, views in self.buckets:
            for i, v in zip(members, views):
                g = self.params[i].grad
                if g is None:  # e.g. dropped by a user hook: a zero share
                    v.zero_()
                elif g.data_ptr() != v.data_ptr():  # the backward replaced the view (someone held a reference)
                    v.copy_(g)
                self.params[i].grad = v
            flat.mul_(weight)
            torch.distributed.all_reduce(flat)
        for p, some in zip(params, present):
            if not some:
                p.grad = None


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in groups of one device and dtype, each about ``BUCKET_BYTES`` at most."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for t in tensors:
        key, nbytes = (t.device, t.dtype), t.numel() * t.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and filled[key] + nbytes > BUCKET_BYTES:
            runs.append([])
            filled[key] = 0
        runs[-1].append(t)
        filled[key] = filled.get(key, 0) + nbytes
    return [b for runs in groups.values() for b in runs if b]

