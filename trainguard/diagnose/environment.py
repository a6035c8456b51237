"""Checks of the software and the machine, needing no config: Python, torch and its build, NumPy
interop, package versions, the CUDA driver, harmful environment variables; the device, its
memory and precisions, CPU, RAM, disk and shared memory."""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from trainguard.errors import first_line
from trainguard.guards.preflight import Check
from trainguard.memory.sizes import fmt_bytes

GiB = 2**30
CORE_PACKAGES = ("numpy", "typer", "pydantic", "rich", "psutil", "PyYAML")
OPTIONAL_PACKAGES = ("tensorboard", "matplotlib", "transformers", "datasets", "torchvision", "lightning")

# (variable, when it is harmful, what it does, the fix)
HARMFUL_ENV = (
    ("CUDA_LAUNCH_BLOCKING", lambda v: v not in ("", "0"), "makes every CUDA kernel launch synchronous (several times slower)",
     "unset it (it is for debugging a CUDA error)"),
    ("PYTORCH_NO_CUDA_MEMORY_CACHING", lambda v: v not in ("", "0"), "turns off the CUDA caching allocator (slow, fragments memory)",
     "unset it"),
    ("TORCHDYNAMO_SUPPRESS_ERRORS", lambda v: v not in ("", "0"), "makes torch.compile failures silently fall back to eager (field report 002)",
     "unset it: trainguard falls back visibly, with the reason"),
    ("TORCHDYNAMO_DISABLE", lambda v: v not in ("", "0"), "disables torch.compile (train.compile has no effect)", "unset it, or set train.compile: false"),
    ("CUDA_VISIBLE_DEVICES", lambda v: v.strip() in ("", "-1", "none", "NoDevFiles"), "hides every GPU from this process",
     "unset it, or list the GPU indices to use"),
    ("OMP_NUM_THREADS", lambda v: v.strip() == "1", "limits CPU math to one thread (a CPU run uses one core)",
     "unset it, or set it to the number of cores (torchrun sets 1 per process on purpose)"),
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_checks() -> list[Check]:
    import torch

    checks = []
    py = sys.version_info
    checks.append(Check("env.python", "pass" if py >= (3, 10) else "fail", f"Python {sys.version.split()[0]} ({sys.executable})",
                        None if py >= (3, 10) else "trainguard needs Python 3.10 or newer"))
    if torch.version.hip:
        build = f"ROCm {torch.version.hip} build"
    elif torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    else:
        build = "CPU-only build"
    checks.append(Check("env.torch", "pass", f"torch {torch.__version__} ({build})"))
    checks.append(_numpy_interop())
    core = ", ".join(f"{p} {_version(p) or 'missing'}" for p in CORE_PACKAGES)
    extra = ", ".join(f"{p} {v}" for p in OPTIONAL_PACKAGES if (v := _version(p)))
    missing = [p for p in CORE_PACKAGES if _version(p) is None]
    checks.append(Check("env.packages", "fail" if missing else "pass", core + (f"; extras: {extra}" if extra else ""),
                        f"pip install {' '.join(missing)}" if missing else None))
    checks.append(_cuda_stack(torch, build))
    bad = [(name, v, what, fix) for name, harmful, what, fix in HARMFUL_ENV
           if (v := os.environ.get(name)) is not None and harmful(v)]
    if bad:
        checks.append(Check("env.variables", "warn", "; ".join(f"{n}={v!r} {what}" for n, v, what, _ in bad),
                            "; ".join(f"{n}: {fix}" for n, _, _, fix in bad)))
    else:
        checks.append(Check("env.variables", "pass", "no environment variable known to slow or break training is set"))
    return checks


def _numpy_interop() -> Check:
    """A NumPy 2 beside a torch built for NumPy 1 crashes at the first from_numpy (field reports)."""
    import numpy as np
    import torch

    try:
        t = torch.from_numpy(np.arange(4, dtype=np.int64))
        back = (t * 2).numpy()
        assert int(back.sum()) == 12
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        return Check("env.numpy", "fail", f"torch {torch.__version__} cannot exchange arrays with NumPy {np.__version__}: "
                     f"{type(e).__name__}: {first_line(e)}",
                     "install the NumPy major version torch was built for (pip install 'numpy<2' for older torch), or upgrade torch")
    return Check("env.numpy", "pass", f"NumPy {np.__version__}: torch.from_numpy and .numpy() work")


def _cuda_stack(torch, build: str) -> Check:
    nvidia = Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()
    if not torch.version.cuda and not torch.version.hip:
        if nvidia:
            return Check("env.cuda", "warn", "an NVIDIA driver is present but torch is a CPU-only build: the GPU is unused",
                         "install a CUDA build of torch (see pytorch.org for the pip command matching your driver)")
        return Check("env.cuda", "skip", "no GPU driver found; torch is a CPU-only build")
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)() if torch.version.cuda else 0
    drv = f", driver supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else ""
    if torch.cuda.is_available():
        return Check("env.cuda", "pass", f"{build}{drv}; {torch.cuda.device_count()} device(s) visible")
    if driver:
        return Check("env.cuda", "fail", f"{build}{drv}, but torch cannot use the GPU (the driver is older than the runtime?)",
                     "update the NVIDIA driver, or install a torch built for an older CUDA")
    return Check("env.cuda", "warn" if nvidia else "skip", f"{build}, but no GPU is visible to this process",
                 "check CUDA_VISIBLE_DEVICES and that the driver is loaded (nvidia-smi)" if nvidia else None)


# ---- the machine -------------------------------------------------------------------------------------
def device_checks(info) -> list[Check]:
    """The device found: name, compute capability, memory (and who else holds it), precisions."""
    if info.type == "cuda":
        cc = ".".join(map(str, info.compute_capability))
        msg = f"{info.name}, compute {cc}, {info.memory_gb:.1f} GiB ({info.free_memory_gb:.1f} GiB free)"
        held = info.memory_gb - info.free_memory_gb
        if info.free_memory_gb < 0.85 * info.memory_gb and held > 1.0:
            return [Check("hardware.device", "warn", msg + f": {held:.1f} GiB is held by another process",
                          "see nvidia-smi: another job on this GPU; trainguard's micro-batch search counts only the free memory")]
        return [Check("hardware.device", "pass", msg)]
    if info.type == "mps":
        return [Check("hardware.device", "pass", f"{info.name}: unified memory, {info.memory_gb:.1f} GiB RAM shared with the CPU "
                      f"({info.free_memory_gb:.1f} GiB free); no bf16 autocast, no pinned memory; set PYTORCH_ENABLE_MPS_FALLBACK=1 "
                      "for ops MPS lacks")]
    return [Check("hardware.device", "pass", f"{info.name}, {info.ram_gb:.1f} GiB RAM ({info.free_memory_gb:.1f} GiB free); no GPU")]


def precision_check(requested: str, info, prof, tf32: bool) -> Check:
    """The configured precision against the target card (the profile) and the device in hand."""
    from trainguard.engine.precision import resolve_precision
    from trainguard.errors import ConfigError

    card = f"{prof.name} ({prof.description})"
    if requested == "bf16" and not prof.bf16:
        return Check("hardware.precision", "fail", f"precision bf16 is not supported on {card}",
                     "use --set train.precision=fp16 (with loss scaling) or fp32, or precision: auto")
    if requested == "fp16" and not prof.fp16:
        return Check("hardware.precision", "warn", f"precision fp16 has no fast path on {card}: it runs slower than fp32",
                     "use precision: auto (the profile's default)")
    try:
        here, note = resolve_precision(requested, info, prof)
    except ConfigError as e:
        return Check("hardware.precision", "fail", e.message, e.hint)
    target = prof.precision if requested == "auto" else requested
    if prof.device != info.type:
        msg = f"precision {requested}: {target} on {prof.name}, {here} here on {info.name}"
    else:
        msg = f"precision {requested} -> {here} on {info.name}" + (f" ({note})" if note else "")
    if tf32 and info.type == "cuda" and info.compute_capability < (8, 0):
        return Check("hardware.precision", "warn", msg + "; train.tf32 has no effect before Ampere (compute 8.0)",
                     "set train.tf32: false (or leave it to the profile)")
    return Check("hardware.precision", "pass", msg)


def cpu_check(info, workers: int | None) -> Check:
    msg = f"{info.cpu_count} CPU cores, {info.ram_gb:.1f} GiB RAM ({info.free_memory_gb:.1f} GiB free)"
    if workers is not None:
        msg += f"; data.num_workers {workers}"
        if workers > max(1, info.cpu_count - 1):
            return Check("hardware.cpu", "warn", msg + f": more loader processes than the {info.cpu_count - 1} cores the training process leaves",
                         f"set data.num_workers: auto (or at most {max(0, info.cpu_count - 1)})")
    if info.free_memory_gb < 1.0:
        return Check("hardware.cpu", "warn", msg + ": less than 1 GiB of RAM free", "close other programs, or lower data.num_workers")
    return Check("hardware.cpu", "pass", msg)


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(run_dir: Path, checkpoint_bytes: int | None, keep: int) -> Check:
    """Free disk where checkpoints go, against ``keep`` checkpoints (plus one being written)."""
    free = shutil.disk_usage(_existing(run_dir)).free
    if checkpoint_bytes is None:
        ok = free >= GiB
        return Check("hardware.disk", "pass" if ok else "warn", f"{fmt_bytes(free)} free at {run_dir}",
                     None if ok else "free some disk space before training")
    need = checkpoint_bytes * (keep + 1)
    msg = f"{fmt_bytes(free)} free at {run_dir}; a checkpoint is about {fmt_bytes(checkpoint_bytes)}"
    if free < checkpoint_bytes * 2:  # the new one is written beside the last before it replaces it
        return Check("hardware.disk", "fail", msg + ": not enough for one checkpoint to be written safely",
                     "free disk space, or point --run-dir at a larger disk")
    if free < need:
        return Check("hardware.disk", "warn", msg + f": less than the {keep + 1} checkpoints kept at once",
                     "free disk space, lower checkpoint.keep_last, or use a larger disk for --run-dir")
    return Check("hardware.disk", "pass", msg + f", {keep + 1} at once")


def shm_check(workers: int, batch_bytes: int | None, shm: Path = Path("/dev/shm")) -> Check:
    """DataLoader workers hand batches over through shared memory; a container's 64 MB /dev/shm
    kills them ("bus error", "DataLoader worker ... killed by signal")."""
    if not shm.is_dir():
        return Check("hardware.shm", "skip", f"no {shm} on this system")
    free = shutil.disk_usage(shm).free
    if workers == 0:
        return Check("hardware.shm", "pass", f"{fmt_bytes(free)} free in {shm}; not used (data.num_workers 0)")
    prefetch = 2  # batches each worker keeps ready (DataLoader's default prefetch_factor)
    need = (batch_bytes or 0) * workers * prefetch
    msg = f"{fmt_bytes(free)} free in {shm} for {workers} loader worker{'s' if workers > 1 else ''}"
    if batch_bytes is not None:
        msg += f" ({workers} x {prefetch} batches of {fmt_bytes(batch_bytes)} in flight)"
    if need and free < need * 1.5:
        return Check("hardware.shm", "fail", msg + ": too small, the workers would crash with a bus error",
                     "give the container more shared memory (docker run --shm-size=8g, or --ipc=host), or set data.num_workers: 0")
    if free < 256 * 2**20:
        return Check("hardware.shm", "warn", msg + ": small for loader workers", "docker run --shm-size=8g (or --ipc=host)")
    return Check("hardware.shm", "pass", msg)
