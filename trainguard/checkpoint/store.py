"""The on-disk checkpoint format and its crash-safe writes.

``checkpoints/step_NNNNNNN/``::

    model.pt        plain state_dict, torch.load(path, weights_only=True)
    model.safetensors  checkpoint.safetensors only: the same weights for safetensors/transformers
                    (tied weights once, under their first name; see :func:`safetensors_weights`)
    trainer.pt      optimizer, scheduler, GradScaler, RNG states, data position, counters, hook state
    optimizer/      sharded runs only (FSDP2): the optimizer's state as DCP shards, one file per
                    rank, in place of trainer.pt's (see checkpoint/sharded.py)
    config.yaml     the resolved config of the run
    manifest.json   {"step": N, "files": {relative path: sha256}, "world_size": W}, written last

A checkpoint is written into a hidden temporary directory, every file fsynced, the manifest
written last, and the directory renamed into place atomically. A directory without a
manifest that verifies is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, writer) -> None:
    with path.open("wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def _write_path(path: Path, writer) -> None:
    writer(path)  # a library that writes the file by name (safetensors)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_weights(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` as safetensors can hold it, which refuses tensors that share memory.

    A tensor under several names (tied weights: transformers ties the input and output embeddings)
    is kept once, under its first name in the model's order, as transformers' ``save_pretrained``
    does; tensors that only overlap are copied apart; values that are not tensors are left out.
    Returns the tensors and ``{dropped name: the name it is stored under}``."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.numel():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        out[name] = t
    users = Counter((t.device, t.untyped_storage().data_ptr()) for t in out.values() if t.numel())
    for name, t in out.items():
        if t.numel() and (users[(t.device, t.untyped_storage().data_ptr())] > 1 or not t.is_contiguous()):
            t = t.contiguous().clone()
        out[name] = t.to("cpu")
    return out, aliases


def safetensors_writer(state: dict):
    """A writer for :func:`write_checkpoint`: ``state`` as ``model.safetensors`` (metadata
    ``format: pt``, which transformers' ``from_pretrained`` requires, and the tied names)."""
    from safetensors.torch import save_file

    tensors, aliases = safetensors_weights(state)
    meta = {"format": "pt", **({"tied": json.dumps(aliases)} if aliases else {})}
    return lambda path: save_file(tensors, str(path), metadata=meta)


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (removed by :func:`clean_temporaries`
    if the write never commits)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_checkpoint(root: Path, step: int, files: dict[str, Any], extra_meta: dict | None = None,
                     tmp: Path | None = None) -> Path:
    """Atomically write a checkpoint of ``files`` (name -> object for torch.save, str/bytes, or a
    callable that writes the file given its path, e.g. :func:`safetensors_writer`).

    ``tmp``: a directory from :func:`begin` that already holds files written by others (every
    rank's shards); they are checksummed with the rest. Returns the committed directory. An
    existing directory for the same step is replaced only after the new one is complete.
    """
    final = root / step_dir_name(step)
    tmp = tmp if tmp is not None else begin(root, step)
    for name, obj in files.items():
        p = tmp / name
        if isinstance(obj, (str, bytes)):
            data = obj.encode() if isinstance(obj, str) else obj
            _write_file(p, lambda f, d=data: f.write(d))
        elif callable(obj):
            _write_path(p, obj)
        else:
            _write_file(p, lambda f, o=obj: torch.save(o, f))
    written = sorted(p for p in tmp.rglob("*") if p.is_file())
    sums = {p.relative_to(tmp).as_posix(): _sha256(p) for p in written}
    for sub in {p.parent for p in written} - {tmp}:
        _fsync_dir(sub)
    manifest = {"step": step, "files": sums, **(extra_meta or {})}
    _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. final save after a periodic one): swap
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint's manifest and checksums verify, else the reason it does not."""
    m = ckpt / MANIFEST
    if not m.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(m.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if _sha256(p) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Committed step directories, newest first (unverified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(ckpt: Path) -> int:
    return int(STEP_RE.match(ckpt.name).group(1))  # type: ignore[union-attr]


def latest_valid(root: Path, before: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (of a step < ``before``, if given), and the
    (path, reason) of newer ones that did not."""
    rejected = []
    for p in list_checkpoints(root):
        if before is not None and step_of(p) >= before:
            continue
        why = verify(p)
        if why is None:
            return p, rejected
        rejected.append((p, why))
    return None, rejected


def world_size(ckpt: Path) -> int:
    """How many processes wrote ``ckpt`` (1 for checkpoints from before multi-process training)."""
    return int(json.loads((ckpt / MANIFEST).read_text()).get("world_size", 1))


def load_file(ckpt: Path, name: str) -> Any:
    """Load one file of a checkpoint with ``weights_only=True``."""
    return torch.load(ckpt / name, map_location="cpu", weights_only=True)


def clean_temporaries(root: Path) -> None:
    """Remove leftovers of writes that were killed before their rename."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(p, ignore_errors=True)
