"""What the machine can do: the CPU's name and flags, bf16 support, and which device to use.

Training (:mod:`lggseg.training.trainer`) turns bf16 autocast and channels_last on for a CPU only when it
has native bf16 instructions (AVX512-BF16 or AMX): there they made the 256x256 training step of
regnetz_040 1.8x faster on a 2-core AMD EPYC (``metrics/bench.json``), while emulated bf16
is slower than float32. The benchmark (:mod:`lggseg.bench.run`) records the same facts with its numbers.

:func:`resolve_device` is the one reading of ``common.device`` (auto | cpu | cuda) for training,
evaluation, prediction and the benchmark. The paper trained on an NVIDIA GPU (section 4.1.3); a
GPU that torch cannot use (a CPU-only torch build, a driver older than the build's CUDA) would
otherwise turn a run into a silent, many times slower CPU run, so ``auto`` says why it falls
back and ``cuda`` refuses. :func:`machine_facts`, :func:`software_versions` and
:func:`git_commit` are what results record about where they were made (their ``provenance``).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lggseg.errors import ConfigError

log = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
_NVIDIA_VERSION = Path("/proc/driver/nvidia/version")
DEVICE_NAMES = ("auto", "cpu", "cuda")


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


# --------------------------------------------------------------------------- devices


def nvidia_driver() -> str | None:
    """The NVIDIA driver present on this machine (its version line, or ``"present"``), else None.

    Looks at ``/proc/driver/nvidia/version`` and for ``nvidia-smi`` on PATH; asks neither torch nor CUDA,
    so it answers also where torch cannot use the GPU.
    """
    try:
        text = _NVIDIA_VERSION.read_text()
    except OSError:
        text = None
    if text is not None:
        m = re.search(r"Kernel Module.*?\s(\d+\.[\d.]+)", text)
        return f"driver {m.group(1)}" if m else "present"
    return "present (nvidia-smi on PATH)" if shutil.which("nvidia-smi") else None


def cuda_unusable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, in one sentence naming the torch build and the driver."""
    build, driver = torch.version.cuda, nvidia_driver()
    torch_name = f"torch {torch.__version__}"
    if driver is None:
        built = "a CPU-only build" if build is None else f"built for CUDA {build}"
        return f"no NVIDIA driver found (/proc/driver/nvidia/version, nvidia-smi); {torch_name} is {built}"
    if build is None:
        return f"{torch_name} is a CPU-only build while an NVIDIA GPU is present ({driver}): install a CUDA build of torch"
    return (f"{torch_name} is built for CUDA {build} but cannot initialise it with the NVIDIA {driver}: the driver "
            f"may be older than CUDA {build} needs, or the GPU is hidden (CUDA_VISIBLE_DEVICES)")


def resolve_device(name: str | torch.device, local_rank: int | None = None, indexed: bool = False) -> torch.device:
    """``common.device`` (auto | cpu | cuda) -> a torch device; a device is returned as it is.

    ``auto`` takes CUDA when torch can use it, else the CPU, and logs the choice; when an NVIDIA GPU is
    present but unusable it warns with the reason. ``cuda`` without a usable GPU is a
    :class:`ConfigError` naming the reason. Any other name (``gpu``, ``cuda:0``, ...) is a
    :class:`ConfigError` listing the three names, wherever it is read. ``local_rank`` picks the GPU of a
    torchrun process; ``indexed`` gives a CUDA device its index (the current one when none is set), as the
    benchmark's records need.
    """
    device = name if isinstance(name, torch.device) else _resolve_name(name, local_rank)
    if indexed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_name(name: str, local_rank: int | None) -> torch.device:
    if name not in DEVICE_NAMES:
        raise ConfigError(f"device must be one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    cuda = torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        log.info("device: %s (%s, common.device: %s)", cuda, torch.cuda.get_device_name(cuda), name)
        return cuda
    reason = cuda_unusable_reason()
    if name == "cuda":
        raise ConfigError(f"common.device is 'cuda' but CUDA is unusable: {reason} (or set common.device: auto/cpu)")
    if nvidia_driver() is not None:
        log.warning("device: cpu, although an NVIDIA GPU is present: %s; falling back to the CPU", reason)
    else:
        log.info("device: cpu (common.device: auto; %s)", reason)
    return torch.device("cpu")


# --------------------------------------------------------------------------- provenance


def machine_facts(device: torch.device, bf16: bool | None = None) -> dict[str, Any]:
    """Where a result was made: device type and name (GPU name or CPU model), native CPU bf16, bf16 autocast."""
    facts: dict[str, Any] = {"device": device.type}
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
    else:
        facts["device_name"] = cpu_name()
    facts["cpu_name"] = cpu_name()
    facts["cpu_native_bf16"] = cpu_bf16()["native"]
    if bf16 is not None:
        facts["bf16_autocast"] = bool(bf16)
        facts["precision"] = "bf16 autocast" if bf16 else "float32"
    return facts


def software_versions() -> dict[str, str | None]:
    """Versions of python, torch (and its CUDA build), timm and segmentation-models-pytorch."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "torch_cuda": torch.version.cuda}
    for key, dist_name in (("timm", "timm"), ("segmentation_models_pytorch", "segmentation-models-pytorch")):
        try:
            out[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd`` (the working directory by default); None outside a git repository.

    Never raises: a result without a commit is still a result.
    """
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def machine_record() -> dict[str, Any]:
    """The machine a CPU run is measured on: CPU facts, cores, software, load average at the start.

    Speed on "2 cores" differs about 2x between the machines of this project, so every timed result
    (an ablation, a snapshot) says which machine and how busy it was.
    """
    return {
        **machine_facts(torch.device("cpu")),
        "cores": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "software": software_versions(),
    }


# --------------------------------------------------------------------------- distributed training (torchrun)


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes (env RANK/WORLD_SIZE/LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leave the process group joined by :func:`init_distributed` (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process of the group (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def all_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every process (a copy; ``values`` itself when there is one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
