"""benchmarks/RESULTS.md: the one file every benchmark appends its section to."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str, out: Path | str = RESULTS) -> None:
    """Append ``text`` (a markdown section) to ``out``, set off by a blank line."""
    with open(out, "a") as handle:
        handle.write("\n" + text.strip("\n") + "\n")


def publish(lines: list[str], keep: bool) -> None:
    """Print a markdown section and, with ``keep`` (a script's --record), append it to RESULTS.md."""
    text = "\n".join(lines)
    print(text)
    if keep:
        record(text)
