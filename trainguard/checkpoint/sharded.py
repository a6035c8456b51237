"""The optimizer of a sharded (FSDP2) run, saved and loaded as shards with
``torch.distributed.checkpoint`` (DCP), inside the checkpoint's atomic directory::

    step_NNNNNNN/optimizer/.metadata       what is where (rank 0 writes it)
    step_NNNNNNN/optimizer/__R_0.distcp    rank R's shards of the optimizer state

Every rank writes its own shards in parallel, so the optimizer state (twice the model in fp32
for Adam) never passes through one process's memory. ``model.pt`` stays a whole, plain state
dict (the run directory's contract). The manifest's checksums cover the shards, so a checkpoint
whose shards were cut short is rejected like any other.

Loading keeps the weights-only rule. DCP reads tensor data with ``torch.load(weights_only=True)``
already, but its ``.metadata`` with a plain ``pickle.load`` and its non-tensor values (learning
rates, betas) with ``torch.load(weights_only=False)``. :class:`WeightsOnlyReader` unpickles the
metadata allowing only DCP's own metadata classes, ``torch.Size``, dtypes, layouts and paths, and
:class:`WeightsOnlyPlanner` loads the values with ``weights_only=True``. (torch's own weights-only
unpickler cannot read the metadata as it is: DCP writes pickle protocol 4, whose FRAME opcode
it refuses.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

DIRNAME = "optimizer"

# (module, name) pairs a DCP .metadata file may name; anything else is refused
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
        "StorageMeta", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, as torch pickles torch.strided
    ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class UnsafeMetadata(pickle.UnpicklingError):
    """A DCP .metadata that names something other than DCP's metadata classes."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if (module, name) not in _ALLOWED:
            raise UnsafeMetadata(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds")
        return super().find_class(module, name)


def read_metadata(path: Path):
    """A DCP ``.metadata`` file, unpickled with only DCP's metadata classes allowed."""
    with open(path, "rb") as f:
        return _MetadataUnpickler(f).load()


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class WeightsOnlyReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            md = read_metadata(Path(self._get_metadata_path(rank)))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return WeightsOnlyReader(str(path))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner.load_bytes uses it

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyPlanner()


def save_optimizer(state: dict, path: Path) -> None:
    """Every rank writes its shards of the optimizer ``state`` (the strategy's
    :meth:`~trainguard.engine.strategy.base.Strategy.optimizer_shards`) under ``path`` (a collective:
    every rank calls it; the files are fsynced before it returns, and rank 0 writes ``.metadata`` last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True))


def load_optimizer(state: dict, path: Path) -> None:
    """Fill ``state`` (the layout the strategy's ``optimizer_shards`` gives) from the shards under
    ``path`` (a collective under a process group; DCP reads each rank's part, resharding if the saved
    layout differs). The strategy then loads it into the optimizer."""
    import torch.distributed.checkpoint as dcp

    from trainguard.errors import RunFailed

    try:  # refused here, whole, before DCP reads it (DCP would log a traceback per fallback it tries)
        read_metadata(path / ".metadata")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise RunFailed(f"{path}: cannot read the optimizer's shards: {e}",
                        "this is not a checkpoint trainguard wrote; move it away to resume from the one before") from e
    dcp.load(state, storage_reader=_reader(path), planner=_planner())
