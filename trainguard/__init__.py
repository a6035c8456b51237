"""trainguard: PyTorch training runs that must not die.

Public API::

    import trainguard
    summary = trainguard.train("configs/quickstart.yaml", overrides=["train.max_steps=50"])

``trainguard.Hook`` and ``trainguard.Event`` are for user hooks. Importing the package does
not import torch; the names below load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "Hook", "Event", "Config", "TrainguardError", "ConfigError", "RunFailed"]

from trainguard.errors import ConfigError, RunFailed, TrainguardError


def __getattr__(name: str):
    if name == "train":
        from trainguard.run import train

        return train
    if name in ("Hook", "Event"):
        from trainguard.engine import events

        return getattr(events, name)
    if name == "Config":
        from trainguard.config.schema import Config

        return Config
    raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
