"""Crash-safe checkpoints: atomic step directories with checksummed manifests."""
