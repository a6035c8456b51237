"""Bundled hardware profiles (YAML files beside this module) and how one is chosen.

A profile describes one kind of device and supplies defaults that sit between the built-in
defaults and the user's YAML (see :func:`trainguard.config.load.resolve_config`). This module
does not import torch; only ``hardware: auto`` probes the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"


class Profile(BaseModel):
    """One hardware profile."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Profile name, as used by `hardware:` and `--profile`.")
    description: str = Field(description="The device in words.")
    device: Literal["cuda", "mps", "cpu"] = Field(description="torch device type.")
    match: list[str] = Field(default_factory=list, description="Substrings of the CUDA device name this profile matches.")
    memory_gb: float = Field(description="Device memory in GiB as torch reports it (`get_device_properties().total_memory`; for cpu: a typical RAM budget).")
    memory_source: str = Field("nominal capacity from the vendor's specification; not yet read off the card with torch",
                               description="Where the memory figure comes from.")
    compute_capability: tuple[int, int] | None = Field(None, description="CUDA compute capability, e.g. [7, 5].")
    fp16: bool = Field(description="Fast fp16 math is available.")
    bf16: bool = Field(description="bf16 is supported natively.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(description="Default training precision.")
    tf32: bool = Field(False, description="Allow TF32 matmuls.")
    compile: bool = Field(False, description="Use torch.compile by default.")
    num_workers: int = Field(2, ge=0, description="Default DataLoader workers.")
    pin_memory: bool = Field(False, description="Pin host memory for transfers.")
    memory_headroom: float = Field(0.1, ge=0, lt=1, description="Fraction of device memory kept free.")
    notes: str = Field("", description="Trade-offs worth knowing on this device.")

    def config_overlay(self) -> dict:
        """The config values this profile supplies (below the user's YAML)."""
        return {
            "hardware": self.name,
            "train": {"precision": self.precision, "tf32": self.tf32, "compile": self.compile},
            "data": {"num_workers": self.num_workers, "pin_memory": self.pin_memory},
            "memory": {"headroom": self.memory_headroom},
        }


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile YAML."""
    import yaml

    from trainguard.yamlfile import no_duplicate_keys, read_text

    text = read_text(path)  # a byte that is not UTF-8: named by line, as in a run config
    try:
        data = yaml.safe_load(text) or {}
        no_duplicate_keys(text, path)
        return Profile.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"invalid hardware profile {path}: {str(e).splitlines()[0]}",
                          "compare it with a bundled one: `trainguard profiles cpu`") from None


def bundled_profiles() -> dict[str, Profile]:
    """All bundled profiles by name, in a stable order (smallest memory first, cpu/mps last)."""
    profs = [load_profile_file(p) for p in sorted(PROFILE_DIR.glob("*.yaml"))]
    profs.sort(key=lambda p: (p.device != "cuda", p.memory_gb, p.name))
    return {p.name: p for p in profs}


def get_profile(name_or_path: str, base_dir: Path | None = None) -> Profile:
    """A bundled profile by name, or a profile YAML by path."""
    profiles = bundled_profiles()
    if name_or_path in profiles:
        return profiles[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        p = Path(name_or_path)
        if not p.is_absolute() and base_dir is not None and not p.exists():
            p = base_dir / p
        if p.is_file():
            return load_profile_file(p)
        raise ConfigError(f"hardware profile file not found: {name_or_path}", "give a path to a profile YAML, or a bundled name")
    import difflib

    close = difflib.get_close_matches(name_or_path, list(profiles), n=1)
    guess = f"did you mean `{close[0]}`? " if close else ""
    raise ConfigError(f"unknown hardware profile `{name_or_path}`",
                      f"{guess}known profiles: {', '.join(profiles)}, or auto")


def match_profile(info) -> tuple[Profile, str]:
    """Pick the bundled profile for a probed :class:`~trainguard.hardware.probe.DeviceInfo`.

    Returns the profile and a sentence saying why it was chosen.
    """
    profiles = bundled_profiles()
    if info.type == "mps":
        return profiles["apple-mps"], "Apple MPS device found"
    if info.type == "cpu":
        return profiles["cpu"], f"no GPU found; {info.cpu_count} CPU cores, {info.ram_gb:.0f} GiB RAM"
    cuda = [p for p in profiles.values() if p.device == "cuda"]
    named = [p for p in cuda if any(m.lower() in info.name.lower() for m in p.match)]
    if named:
        best = min(named, key=lambda p: abs(p.memory_gb - info.memory_gb))
        return best, f"device name {info.name!r} matches {best.match} and {info.memory_gb:.0f} GiB memory"
    usable = [p for p in cuda if p.memory_gb <= info.memory_gb * 1.05
              and (not p.bf16 or info.bf16)] or cuda
    best = max(usable, key=lambda p: p.memory_gb)
    return best, (f"no profile names {info.name!r}; nearest below its {info.memory_gb:.0f} GiB "
                  f"with matching bf16 support is {best.name}")


def choose_profile(hardware: str, base_dir: Path | None = None) -> tuple[Profile, str]:
    """Resolve ``hardware:`` (a name, a path, or ``auto``) to a profile and the reason."""
    if hardware == "auto":
        from trainguard.hardware.probe import probe

        return match_profile(probe())
    return get_profile(hardware, base_dir), "named in the config or by --profile"
