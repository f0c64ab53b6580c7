"""benchmarks/RESULTS.md: the one file every benchmark appends its section to, each naming the processor it ran on."""

from __future__ import annotations

import os
from pathlib import Path

from services.backends.cpu import this_cpu

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str, out: Path | str = RESULTS) -> None:
    """Append ``text`` (a markdown section) to ``out``, set off by a blank line, named for its processor."""
    with open(out, "a") as handle:
        handle.write("\n" + with_machine(text) + "\n")


def with_machine(text: str) -> str:
    """``text`` with the processor line under its title, unless it names it already (a script that took it at its
    start, with the load of then)."""
    lines = text.strip("\n").splitlines()
    if not any(line.startswith("CPU: ") for line in lines):
        lines[1:1] = ["", machine_line()]
    return "\n".join(lines)


def machine_line() -> str:
    """The processor (model; bf16, AMX, VNNI units) and the load it shared, for under a section's title: numbers
    from processors with and without bf16 units differ by up to 40x, so no section goes without it."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"CPU: {this_cpu().summary()}; load average {load} (1, 5, 15 min) when the section was written."


def publish(lines: list[str], keep: bool) -> None:
    """Print a markdown section (its title, the processor line, the rest) and, with ``keep`` (a script's
    --record), append it to RESULTS.md."""
    text = with_machine("\n".join(lines))
    print(text)
    if keep:
        record(text)
