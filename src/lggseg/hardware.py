"""What the CPU can do: its name, its flags and whether oneDNN runs bfloat16 on it natively.

Training (:mod:`lggseg.train`) turns bf16 autocast and channels_last on for a CPU only when it
has native bf16 instructions (AVX512-BF16 or AMX): there they made the 256x256 training step of
regnetz_040 1.8x faster on a 2-core AMD EPYC (``metrics/bench.json``), while emulated bf16
is slower than float32. The benchmark (:mod:`lggseg.bench`) records the same facts with its numbers.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def cpu_name() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", _CPUINFO.read_text(), re.MULTILINE)
        if m:
            return " ".join(m.group(1).split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_bf16() -> dict[str, bool]:
    """Whether oneDNN runs bf16 on this CPU, and whether natively (AVX512-BF16 / AMX) or emulated."""
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    try:
        supported = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = native
    return {"supported": supported or native, "native": native}
