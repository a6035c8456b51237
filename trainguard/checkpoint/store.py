"""The on-disk checkpoint format and its crash-safe writes.

``checkpoints/step_NNNNNNN/``::

    model.pt        plain state_dict, torch.load(path, weights_only=True)
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
    """Atomically write a checkpoint of ``files`` (name -> object for torch.save, or str/bytes).

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
