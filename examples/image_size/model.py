"""A small ResNet-style classifier in plain torch (torchvision is optional). Like many image
models (timm's with a fixed `img_size`, or a flatten before the head) it is built for one input
size: the head's width follows from `input_size`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, input_size: int = 224, classes: int = 3, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 4, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2))
        self.pool = nn.AvgPool2d(4)
        side = input_size // 4 // 2 // 2 // 4
        self.head = nn.Linear(4 * width * side * side, classes)

    def forward(self, image, label=None):
        logits = self.head(self.pool(self.stages(self.stem(image))).flatten(1))
        return {"logits": logits, "loss": F.cross_entropy(logits, label)} if label is not None else {"logits": logits}
