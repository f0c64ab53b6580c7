"""What this processor computes natively: the facts auto selection (services/backends/__init__.py), the precision
export (hqclip/jobs/precision.py) and every benchmark header (benchmarks/results.py) rest on.

Read from ``/proc/cpuinfo`` (Linux) and, where OpenVINO is installed, from its CPU plugin's
``OPTIMIZATION_CAPABILITIES`` (it lists ``BF16`` only where the matrix units compute bf16). A precision the
processor lacks units for still runs, emulated: bf16 on a CPU without AVX512-BF16 or AMX ran 40x slower than fp32
on a ViT-B-16 (docs/precision.md).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # asimddp: Arm's int8 dot product
AMX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Cpu:
    model: str
    flags: frozenset[str]
    openvino: tuple[str, ...] = ()  # OpenVINO's OPTIMIZATION_CAPABILITIES; empty without OpenVINO

    @property
    def bf16_native(self) -> bool:
        """bf16 matrix units: AVX512-BF16 or AMX-BF16 (or OpenVINO says BF16)."""
        return any(f in self.flags for f in BF16_FLAGS) or "BF16" in self.openvino

    @property
    def int8_native(self) -> bool:
        """int8 dot-product units: VNNI (AVX-512 or AVX), AMX-INT8, or Arm's dot product."""
        return any(f in self.flags for f in INT8_FLAGS)

    def native(self, precision: str) -> bool:
        return {"fp32": True, "bf16": self.bf16_native, "int8": self.int8_native}[precision]

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def summary(self) -> str:
        """One line naming the processor and its units, e.g. for benchmark headers."""
        def yes(present: bool) -> str:
            return "yes" if present else "no"

        return (f"{self.model}; {self.cores} cores; avx512_bf16 {yes('avx512_bf16' in self.flags)}, "
                f"AMX {yes(any(f in self.flags for f in AMX_FLAGS))}, "
                f"VNNI {yes(any(f in self.flags for f in ('avx512_vnni', 'avx_vnni')))}, "
                f"AVX-512 {yes('avx512f' in self.flags)}")



def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The model name and flag set of the first processor in a /proc/cpuinfo text (x86 or Arm)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def openvino_capabilities() -> tuple[str, ...]:
    try:
        import openvino as ov
    except ImportError:
        return ()
    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@cache
def this_cpu() -> Cpu:
    """This machine's processor (read once per process)."""
    info = Path("/proc/cpuinfo")
    model, flags = parse_cpuinfo(info.read_text()) if info.is_file() else ("", frozenset())
    return Cpu(model or platform.processor() or platform.machine(), flags, openvino_capabilities())
