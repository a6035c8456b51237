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
written last, and the directory renamed into place atomically; a write that fails (a full disk)
is removed and raises :class:`CheckpointWriteFailed`. A directory without a manifest that
verifies, or whose files do not load weights-only (:func:`check_loadable`), is not a checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

from trainguard.checkpoint import sharded
from trainguard.errors import RunFailed, first_line

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


class _Recorder:
    """The file torch.save writes through, keeping the OSError it hides: torch reports a full disk
    as ``RuntimeError: ... unexpected pos 704 vs 598``."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f) -> None:
    rec = _Recorder(f)
    try:
        torch.save(obj, rec)
    except RuntimeError:
        if rec.error is not None:
            raise rec.error from None  # the disk's own error (ENOSPC, EIO), not torch's
        raise


class CheckpointWriteFailed(RunFailed):
    """A checkpoint could not be written (a full disk, an I/O error); nothing of it is left behind."""

    def __init__(self, message: str, hint: str, no_space: bool):
        super().__init__(message, hint)
        self.no_space = no_space


def _write_failed(root: Path, final: Path, e: BaseException) -> CheckpointWriteFailed:
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    why = ("no space left on device" if no_space else
           os.strerror(e.errno).lower() if isinstance(e, OSError) and e.errno else f"{type(e).__name__}: {first_line(e, 160)}")
    intact = next((p for p in list_checkpoints(root) if (p / MANIFEST).is_file()), None)
    kept = f"the newest checkpoint, {intact}, is intact" if intact else "there is no earlier checkpoint"
    fix = "free space on the disk that holds it (or lower checkpoint.keep_last, or give --run-dir on a larger disk)" \
        if no_space else "check the disk that holds it"
    again = f"it resumes from {intact.name}" if intact else "it starts again from step 0"
    return CheckpointWriteFailed(f"cannot write checkpoint {final}: {why}; nothing of it was kept, {kept}",
                                 f"{fix}, then run the same command again: {again}", no_space)


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
    try:  # a write that fails (a full disk) leaves nothing behind: the newest checkpoint stays the newest
        tmp = tmp if tmp is not None else begin(root, step)
        for name, obj in files.items():
            p = tmp / name
            if isinstance(obj, (str, bytes)):
                data = obj.encode() if isinstance(obj, str) else obj
                _write_file(p, lambda f, d=data: f.write(d))
            elif callable(obj):
                _write_path(p, obj)
            else:
                _write_file(p, lambda f, o=obj: _torch_save(o, f))
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {p.relative_to(tmp).as_posix(): _sha256(p) for p in written}
        for sub in {p.parent for p in written} - {tmp}:
            _fsync_dir(sub)
        manifest = {"step": step, "files": sums, **(extra_meta or {})}
        _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        _fsync_dir(tmp)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_failed(root, final, e) from None
        raise
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
        why = verify(p) or check_loadable(p)
        if why is None:
            return p, rejected
        rejected.append((p, why))
    return None, rejected


def world_size(ckpt: Path) -> int:
    """How many processes wrote ``ckpt`` (1 for checkpoints from before multi-process training)."""
    return int(json.loads((ckpt / MANIFEST).read_text()).get("world_size", 1))


class Unloadable(RunFailed):
    """A checkpoint file that verifies but does not load weights-only (the reason says why, without
    torch's advice to load it with ``weights_only=False``, which would run whatever it holds)."""


# the sentences of torch's message that advise loading unsafely, or point at its documentation
_TORCH_ADVICE = re.compile(r"weights_only|trusted source|safe_globals|torch\.load|If you are seeing this|"
                           r"This can happen|internal miniz", re.IGNORECASE)


def load_error(name: str, e: BaseException) -> str:
    """Why checkpoint file ``name`` did not load, in one line (torch's unsafe advice left out)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"unsupported global: {m.group(1)}" if m else _plain(text).replace("WeightsUnpickler error: ", "")
        return f"{name}: not loadable with weights_only ({what or 'refused by the weights-only unpickler'})"
    if "mmap can only be used" in text:  # torch's check that the file is its zip format
        return f"{name}: not loadable (not a file torch.save wrote)"
    return f"{name}: not loadable ({type(e).__name__}" + (f": {_plain(text)})" if _plain(text) else ")")


def _plain(text: str) -> str:
    sentences = (s.strip() for line in text.splitlines() for s in re.split(r"(?<=\.)\s+", line))
    return next((s.rstrip(".") for s in sentences if s and not _TORCH_ADVICE.search(s)), "")[:200]


_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError,
                AttributeError, OSError)  # what torch.load raises on a file it cannot read


def check_loadable(ckpt: Path) -> str | None:
    """None if every file a resume reads loads weights-only, else why not. The tensors are mapped
    (``mmap``), not read: the check unpickles everything, and costs little for a large checkpoint."""
    for name in ("model.pt", "trainer.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        try:
            torch.load(ckpt / name, map_location="cpu", weights_only=True, mmap=True)
        except _LOAD_ERRORS as e:
            return load_error(name, e)
    try:
        config = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"config.yaml: not readable ({type(e).__name__}: {first_line(e, 160)})"
    if not isinstance(config, dict):
        return "config.yaml: not a config mapping"
    if (ckpt / sharded.DIRNAME / ".metadata").is_file():
        try:
            sharded.read_metadata(ckpt / sharded.DIRNAME / ".metadata")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
            return f"{sharded.DIRNAME}/.metadata: not loadable ({first_line(e, 160)})"
    return None


def load_file(ckpt: Path, name: str) -> Any:
    """Load one file of a checkpoint with ``weights_only=True``; :class:`Unloadable` if it does not."""
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        raise Unloadable(f"checkpoint {ckpt}: {load_error(name, e)}",
                         "move that checkpoint directory away and run the same command again: it resumes from the one before") from None


def set_aside_rejected(ckpt: Path) -> Path:
    """Rename a checkpoint that resume rejected to ``rejected-step_NNNNNNN`` beside it: kept for a
    look, never deleted, and neither replaced by a new save of its step nor pruned."""
    target, n = ckpt.with_name(f"rejected-{ckpt.name}"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"rejected-{ckpt.name}.{n}")
    os.replace(ckpt, target)
    return target


def clean_temporaries(root: Path) -> None:
    """Remove leftovers of writes that were killed before their rename."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(p, ignore_errors=True)
