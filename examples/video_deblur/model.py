"""A small video restoration net in the style of VRT (field report 002): 5-D (batch, channels,
time, height, width) Conv3d blocks, stochastic depth (`drop_path`, with its data-dependent
branch), and gradient checkpointing around every block to save activation memory."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    if drop_prob == 0.0 or not training:  # the branch dynamo tripped on in the field report
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    def __init__(self, width: int, drop_prob: float):
        super().__init__()
        self.conv1 = nn.Conv3d(width, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        self.drop_prob = drop_prob

    def forward(self, x):
        return x + drop_path(self.conv2(F.gelu(self.conv1(x))), self.drop_prob, self.training)


class VideoDeblur(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 4, drop_path: float = 0.1, checkpointing: bool = True):
        super().__init__()
        self.inp = nn.Conv3d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width, drop_path * (i + 1) / blocks) for i in range(blocks))
        self.out = nn.Conv3d(width, 3, 3, padding=1)
        self.checkpointing = checkpointing

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpointing

    def forward(self, blurry, sharp=None):
        h = self.inp(blurry)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointing and self.training else block(h)
        restored = blurry + self.out(h)
        return {"restored": restored, "loss": F.l1_loss(restored, sharp)} if sharp is not None else {"restored": restored}
