"""Toys for tests/test_cli_usage.py."""


def NotBuilt(**kwargs):
    """A model that must not be built: `train --print-config` resolves the config only."""
    raise RuntimeError("the model was built")
