"""A bidirectional GRU with CTC loss over swipe traces (field report 001's model, small)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.ctc_swipe.swipes import N_FEATURES, N_KEYS


class SwipeCTC(nn.Module):
    def __init__(self, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(N_FEATURES, hidden)  # 8 motion features + 27 keys: computed, not typed in
        self.rnn = nn.GRU(hidden, hidden, layers, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, N_KEYS + 1)  # + the CTC blank

    def forward(self, features, feature_len, targets, target_len):
        h, _ = self.rnn(torch.relu(self.inp(features)))
        log_probs = F.log_softmax(self.out(h).float(), -1).transpose(0, 1)  # (T, B, C), fp32 for CTC
        loss = F.ctc_loss(log_probs, targets, feature_len, target_len, blank=0, reduction="mean")
        return {"loss": loss, "log_probs": log_probs}
