"""`trainguard profiles [NAME]`: list the bundled hardware profiles, or show one. No torch import."""

from __future__ import annotations

from typing import Optional

import typer
from rich import box
from rich.table import Table
from typing import Annotated

from trainguard.cli._errors import console as make_console, user_errors


def profiles_command(
    profile: Annotated[Optional[str], typer.Argument(metavar="NAME", show_default=False, help="A profile name (or path to a profile YAML) to show in full.")] = None,
) -> None:
    """List the bundled hardware profiles, or show one."""
    from trainguard.hardware.profiles import bundled_profiles, get_profile

    console = make_console()
    with user_errors():
        if profile:
            p = get_profile(profile)
            t = Table(title=f"profile {p.name}", show_header=False, box=box.SIMPLE)
            for key, field in type(p).model_fields.items():
                t.add_row(key, str(getattr(p, key)), *([field.description or ""] if console.width >= 120 else []))
            console.print(t)
            return
        wide = console.width >= 120
        t = Table(title="hardware profiles (use with `hardware:` or --profile)", box=box.SIMPLE_HEAD,
                  padding=(0, 1 if console.width > 81 else 0, 0, 0), pad_edge=False, show_edge=False)  # 80 columns: one space apart
        for col in ("name", "device", "memory", "cc", "precision", "tf32", "compile", "workers", "headroom"):
            t.add_column(col, no_wrap=col == "name", overflow="fold")  # a narrow terminal wraps a cell, never cuts it
        if wide:
            t.add_column("description", ratio=1)
        for p in bundled_profiles().values():
            cc = ".".join(map(str, p.compute_capability)) if p.compute_capability else "-"
            row = [p.name, p.device, f"{p.memory_gb:g} GiB", cc, p.precision, "yes" if p.tf32 else "no",
                   "yes" if p.compile else "no", str(p.num_workers), f"{p.memory_headroom:.0%}"]
            t.add_row(*row, *([p.description] if wide else []))
        console.print(t)
