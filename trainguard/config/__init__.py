"""Configuration: typed schema, YAML loading with extends/profiles/--set, and `_target_`."""

from trainguard.config.schema import Config

__all__ = ["Config"]
