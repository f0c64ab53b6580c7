"""benchmarks/gpu_check.sh, the prepared GPU-host check, runs every step on a CPU (--cpu: a tiny random model).

No GPU here: this proves the script and the benchmarks it drives work up to the GPU-only parts (those give rows
saying what they need), so the one run on a GPU host is not spent on a typo.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(2100)
def test_gpu_check_runs_every_step_on_a_cpu_and_appends_one_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--results", str(results), "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=2000)
    assert (out / "gpu_check.md").exists(), f"exit {proc.returncode}: " + proc.stdout[-4000:] + proc.stderr[-2000:]
    section = (out / "gpu_check.md").read_text()
    assert proc.returncode == 0, section + proc.stdout[-4000:] + proc.stderr[-2000:]
    assert results.read_text() == "# Benchmark results\n" + section  # appended once, nothing else touched
    assert section.startswith("\n## GPU check (benchmarks/gpu_check.sh): CPU ")
    assert "FAISS on the GPU: not run" in section  # faiss-cpu here: the row says why
    measured = r"\| {runtime} \| fp32 \| 4 \| [\d,]+ \| [\d.]+ \| [\d.]+% \|"
    for runtime in ("torch-eager", "torch-compile", "torch-compile-cudagraph"):
        assert re.search(measured.format(runtime=runtime), section), runtime
    assert "| torch-cudagraph | fp32 | all | - | - | - | torch-cudagraph needs --device cuda |" in section
    for objective in ("contrastive", "hq-clip"):
        assert re.search(rf"\| {objective} \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", section), objective
    assert "ran out of" not in section and "failed" not in section
    assert (out / "gpu_check.log").stat().st_size > 0
