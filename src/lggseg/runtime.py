"""What the machine can do: the CPU's name and flags, bf16 support, and which device to use.

Training (:mod:`lggseg.training.step`) turns bf16 autocast on for a CPU only when it has native bf16
instructions (AVX512-BF16 or AMX), while emulated bf16 is slower than float32. The environment variable
``LGGSEG_CPU_BF16`` (:func:`cpu_bf16_switch`) overrides that probe: ``auto`` (the default) probes,
``native`` behaves as if the CPU had native bf16 (the bf16 code paths then run emulated, slowly, on any
x86 CPU: how the tests exercise them on either machine type), ``off`` as if it had none. channels_last is
not used on a CPU (libtorch_cpu crashed with SIGSEGV under it, issue 21) unless
``LGGSEG_CPU_CHANNELS_LAST=unsafe`` (:func:`cpu_channels_last_unsafe`). The benchmark
(:mod:`lggseg.bench.run`) records the same facts with its numbers.

:func:`resolve_device` is the one reading of ``common.device`` (auto | cpu | cuda) for training,
evaluation, prediction and the benchmark. The paper trained on an NVIDIA GPU (section 4.1.3); a
GPU that torch cannot use (a CPU-only torch build, a driver older than the build's CUDA) would
otherwise turn a run into a silent, many times slower CPU run, so ``auto`` says why it falls
back and ``cuda`` refuses. :func:`machine_facts`, :func:`software_versions` and
:func:`git_commit` and :func:`project_origin` are what results record about where they were made (their
``provenance``).
"""

from __future__ import annotations

import json
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
from lggseg.io import ORIGIN_FILE

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


CPU_BF16_ENV = "LGGSEG_CPU_BF16"
CPU_BF16_SWITCHES = ("auto", "native", "off")
CPU_CHANNELS_LAST_ENV = "LGGSEG_CPU_CHANNELS_LAST"


def cpu_bf16_switch() -> str:
    """``LGGSEG_CPU_BF16``: ``auto`` (unset or empty: probe the CPU), ``native`` or ``off``; else a ConfigError."""
    value = os.environ.get(CPU_BF16_ENV, "").strip().lower() or "auto"
    if value not in CPU_BF16_SWITCHES:
        raise ConfigError(f"{CPU_BF16_ENV} must be one of {', '.join(CPU_BF16_SWITCHES)}, got {value!r}")
    return value


def probe_cpu_bf16() -> dict[str, bool]:
    """What this CPU itself does: whether oneDNN runs bf16 on it, and whether natively (AVX512-BF16 / AMX)."""
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    try:
        supported = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = native
    return {"supported": supported or native, "native": native}


def cpu_bf16() -> dict[str, bool]:
    """Whether to treat this CPU as running bf16 (``supported``) and natively (``native``): the probe
    (:func:`probe_cpu_bf16`) unless ``LGGSEG_CPU_BF16`` says ``native`` (both true: torch emulates bf16
    where the CPU lacks it) or ``off`` (not native)."""
    switch = cpu_bf16_switch()
    if switch == "native":
        return {"supported": True, "native": True}
    probe = probe_cpu_bf16()
    return {**probe, "native": False} if switch == "off" else probe


def cpu_channels_last_unsafe() -> bool:
    """Whether ``LGGSEG_CPU_CHANNELS_LAST=unsafe`` allows channels_last on a CPU (unset, empty, ``off``: no).

    Unsafe: with it, libtorch_cpu crashed the process (SIGSEGV / general-protection fault) on a 2-core
    AMD EPYC with AVX512-BF16, for bf16 autocast over several encoders and for repvgg_b2 also in float32
    (issue 21); without it 0 crashes at the same speed. Any other value is a ConfigError.
    """
    value = os.environ.get(CPU_CHANNELS_LAST_ENV, "").strip().lower()
    if value not in ("", "off", "unsafe"):
        raise ConfigError(f"{CPU_CHANNELS_LAST_ENV} must be 'unsafe' (or unset/off), got {value!r}")
    return value == "unsafe"


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
    """Where a result was made: device type and name (GPU name or CPU model), native CPU bf16 (and
    ``LGGSEG_CPU_BF16`` when it is not ``auto``), bf16 autocast."""
    facts: dict[str, Any] = {"device": device.type}
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
    else:
        facts["device_name"] = cpu_name()
    facts["cpu_name"] = cpu_name()
    facts["cpu_native_bf16"] = probe_cpu_bf16()["native"]  # the hardware, whatever LGGSEG_CPU_BF16 says
    if cpu_bf16_switch() != "auto":
        facts["cpu_bf16_switch"] = cpu_bf16_switch()
    if bf16 is not None:
        facts["bf16_autocast"] = bool(bf16)
        facts["precision"] = "bf16 autocast" if bf16 else "float32"
    return facts


# Distributions whose versions a result records (None: not installed). The optional ones say which
# install ran: an offline GPU node has neither albumentations nor dvclive (pyproject's "pipeline" extra).
_RECORDED_DISTRIBUTIONS = (
    ("timm", "timm"), ("segmentation_models_pytorch", "segmentation-models-pytorch"), ("numpy", "numpy"),
    ("albumentations", "albumentations"), ("dvclive", "dvclive"),
)


def software_versions() -> dict[str, str | None]:
    """Versions of python, lggseg, torch (and its CUDA build), timm, segmentation-models-pytorch, numpy
    and the optional albumentations and dvclive (None where absent)."""
    from importlib import metadata

    from lggseg import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "lggseg": __version__,
                                  "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for key, dist_name in _RECORDED_DISTRIBUTIONS:
        try:
            out[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


COMMIT_FILE = Path(__file__).with_name("_commit.txt")
"""Written by ``make bundle`` (git-ignored): the commit of a tree copied without ``.git``."""
_COMMIT = re.compile(r"[0-9a-f]{40,64}")


def git_commit(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``; None outside a git repository.

    Without ``cwd`` (the working directory: the code that runs) and outside a repository, the commit
    that ``make bundle`` wrote to :data:`COMMIT_FILE`, for a tree that travelled without ``.git``.
    Never raises: a result without a commit is still a result.
    """
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        proc = None
    if proc is not None and proc.returncode == 0 and _COMMIT.fullmatch(proc.stdout.strip()):
        return proc.stdout.strip()
    if cwd is not None:  # another folder (a workspace, a repository) than this package's source tree
        return None
    try:
        bundled = COMMIT_FILE.read_text().strip()
    except OSError:
        return None
    return bundled if _COMMIT.fullmatch(bundled) else None


def project_origin(cwd: str | Path | None = None) -> dict[str, Any]:
    """The project commit a run's code came from: ``{"commit": sha or None, "uncommitted_changes": bool or
    None, "workspace": bool}``.

    In a workspace (a folder holding :data:`ORIGIN_FILE`, the stages' working directory) it is the commit
    of the project the workspace was made from, and whether the mirrored files had uncommitted changes
    then; elsewhere it is :func:`git_commit` with ``uncommitted_changes`` unknown (None). Never raises.
    """
    path = (Path.cwd() if cwd is None else Path(cwd)) / ORIGIN_FILE
    if not path.is_file():
        return {"commit": git_commit(cwd), "uncommitted_changes": None, "workspace": False}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    record = record if isinstance(record, dict) else {}  # unreadable: a workspace whose origin is unknown
    commit, dirty = record.get("commit"), record.get("uncommitted_changes")
    return {"commit": commit if isinstance(commit, str) and _COMMIT.fullmatch(commit) else None,
            "uncommitted_changes": dirty if isinstance(dirty, bool) else None, "workspace": True}


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
