"""A CNN encoder and a GRU decoder with teacher forcing: image in, caption tokens out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.captioning.captions import ShapeCaptions


class Captioner(nn.Module):
    def __init__(self, vocab_size: int | None = None, width: int = 64, hidden: int = 256):
        super().__init__()
        vocab_size = vocab_size or len(ShapeCaptions(n=1).tokenizer)  # the tokenizer's, built from the captions
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(2 * width, hidden, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.decoder = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, image, caption):
        h0 = torch.tanh(self.encoder(image)).unsqueeze(0)
        y, _ = self.decoder(self.embed(caption[:, :-1]), h0)  # predict token t+1 from tokens <= t
        logits = self.out(y)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), caption[:, 1:].reshape(-1), ignore_index=0)
        return {"loss": loss, "logits": logits}
