"""Toys for tests/test_optim.py: an optimizer that moves the weights whatever its `lr` says."""

import torch


class DecayingRelativeStep(torch.optim.Optimizer):
    """Steps of 0.1/sqrt(step) and a weight shrink under its own name (`shrink`, not `weight_decay`),
    both ignoring `lr` (as relative-step optimizers do): a step at lr 0 on zero gradients still
    moves every weight."""

    def __init__(self, params, lr=None, shrink: float = 0.01):
        super().__init__(params, {"lr": lr, "shrink": shrink})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                p.mul_(1 - group["shrink"]).add_(p.grad, alpha=-0.1 / state["step"] ** 0.5)
