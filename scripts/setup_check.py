"""Is this Python environment already set up for this checkout? ``./setup.sh``'s fast path.

    python scripts/setup_check.py [EXTRA...]   exit 0: ready (pip can be skipped); 1: the reason on stdout
    python scripts/setup_check.py --record     after a successful install: remember this pyproject.toml

Ready means all of: trainguard is installed in editable mode from this checkout; pyproject.toml is
the one the last ``./setup.sh`` installed from (its sha256, kept in the environment, sys.prefix);
every requirement of the package and of the EXTRAs asked for is installed at a matching version.
Anything else, or anything this cannot tell, is "not ready": setup.sh then runs pip as before.
Standard library only (plus `packaging`, or pip's own copy of it), so it runs in a fresh venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAMP = Path(sys.prefix) / "trainguard-setup.json"


def digest(pyproject: Path) -> str:
    return hashlib.sha256(pyproject.read_bytes()).hexdigest()


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a fresh venv has no `packaging`, but pip carries one (not pip's API: only a fallback)
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def unmet(requirements: list[str], extras: tuple[str, ...] = ()) -> list[str]:
    """The requirements (PEP 508 strings) that are not installed at a matching version, in words."""
    Requirement = _requirement_class()
    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue  # another extra's, or another platform's
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(f"{req.name} {have} is installed, {req.specifier} is needed")
    return missing


def requirements(pyproject: Path, extras: tuple[str, ...]) -> list[str] | None:
    """pyproject.toml's requirements for these extras; None on Python 3.10 (no tomllib): the installed
    metadata's are the same then, as the sha256 above matched."""
    try:
        import tomllib
    except ImportError:
        return None
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return list(project.get("dependencies", [])) + [r for e in extras for r in optional.get(e, [])]


def not_ready(extras: tuple[str, ...] = (), *, pyproject: Path = REPO / "pyproject.toml", stamp: Path = STAMP) -> str | None:
    """Why pip must run (a sentence), or None when everything is in place already."""
    # the environment's own record, not the trainguard.egg-info that the editable build leaves in the checkout
    paths = [p for p in sys.path if p and Path(p).resolve() != REPO]
    dist = next(iter(metadata.distributions(name="trainguard", path=paths)), None)
    if dist is None:
        return "trainguard is not installed in this environment"
    where = json.loads(dist.read_text("direct_url.json") or "{}")
    if where.get("url") != REPO.as_uri() or not where.get("dir_info", {}).get("editable"):
        return f"trainguard is not installed from {REPO} in editable mode"
    try:
        recorded = json.loads(stamp.read_text())
    except FileNotFoundError:
        return "no record of a ./setup.sh install in this environment"
    except (OSError, ValueError) as e:
        return f"the install record {stamp} is unreadable ({e})"
    if recorded.get("project") != str(REPO) or recorded.get("pyproject_sha256") != digest(pyproject):
        return "pyproject.toml changed since the last install"
    try:
        missing = unmet(requirements(pyproject, extras) or dist.requires or [], extras)
    except ImportError:
        return "cannot check the requirements here (no `packaging`)"
    return "; ".join(missing) or None


def record(*, pyproject: Path = REPO / "pyproject.toml", stamp: Path = STAMP) -> None:
    stamp.write_text(json.dumps({"project": str(REPO), "pyproject_sha256": digest(pyproject)}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        if sys.prefix == sys.base_prefix and os.environ.get("CONDA_PREFIX") != sys.prefix:
            print("setup: note: not a virtual environment, so nothing is recorded in it: each ./setup.sh runs pip")
            sys.exit(0)
        try:
            record()
        except OSError as e:
            print(f"setup: note: could not record the install in {STAMP} ({e}); the next ./setup.sh runs pip again")
        sys.exit(0)
    why = not_ready(tuple(sys.argv[1:]))
    print(why or "ready")
    sys.exit(1 if why else 0)
