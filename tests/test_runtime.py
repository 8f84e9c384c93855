"""lggseg.runtime: one reading of ``common.device`` for every stage, honest about an unusable GPU."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

import lggseg
import lggseg.runtime as H
from lggseg.config import ConfigError

NVIDIA_PROC = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"


@pytest.fixture
def no_cuda(monkeypatch):
    """torch cannot use CUDA (its build says CUDA 12.4); the NVIDIA driver detection is set per test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


def test_train_evaluate_and_bench_share_one_implementation():
    import lggseg.bench.run as B
    import lggseg.evaluation.evaluate as E

    # training resolves its device in lggseg.runtime.init_distributed
    assert E.resolve_device is H.resolve_device and B.resolve_device is H.resolve_device


def test_there_is_one_resolve_device_in_the_package():
    """No module defines a device rule of its own (issue #12): one ``def resolve_device`` in the package."""
    from pathlib import Path

    src = Path(H.__file__).resolve().parent
    found = [p for p in src.rglob("*.py") if "def resolve_device(" in p.read_text()]
    assert found == [Path(H.__file__).resolve()]


def test_indexed_cuda_gets_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert H.resolve_device("cuda", indexed=True) == torch.device("cuda", 0)
    assert H.resolve_device("cpu", indexed=True) == torch.device("cpu")
    assert H.resolve_device(torch.device("cuda"), indexed=True) == torch.device("cuda", 0)


@pytest.mark.parametrize(("text", "expected"), [
    (NVIDIA_PROC, "driver 535.104.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build\n", "driver 550.54.15"),
    ("something else\n", "present"),
])
def test_nvidia_driver_reads_the_kernel_module_version(monkeypatch, tmp_path, text, expected):
    path = tmp_path / "version"
    path.write_text(text)
    monkeypatch.setattr(H, "_NVIDIA_VERSION", path)
    assert H.nvidia_driver() == expected


def test_no_driver_file_and_no_nvidia_smi_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(H, "_NVIDIA_VERSION", tmp_path / "absent")
    monkeypatch.setattr(H.shutil, "which", lambda name: None)
    assert H.nvidia_driver() is None
    monkeypatch.setattr(H.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert H.nvidia_driver() == "present (nvidia-smi on PATH)"


def test_cpu_is_taken_as_asked_without_a_note(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a GPU
    with caplog.at_level(logging.INFO, logger="lggseg.runtime"):
        assert H.resolve_device("cpu") == torch.device("cpu")
    assert caplog.records == []


def test_auto_logs_the_cpu_it_chose(monkeypatch, no_cuda, caplog):
    monkeypatch.setattr(H, "nvidia_driver", lambda: None)
    with caplog.at_level(logging.INFO, logger="lggseg.runtime"):
        assert H.resolve_device("auto") == torch.device("cpu")
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO and rec.getMessage().startswith("device: cpu (common.device: auto;")
    assert "no NVIDIA driver found" in rec.getMessage()


def test_auto_logs_the_gpu_it_chose(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with caplog.at_level(logging.INFO, logger="lggseg.runtime"):
        assert H.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
        assert H.resolve_device("cuda") == torch.device("cuda")
    assert [r.getMessage() for r in caplog.records] == [
        "device: cuda:1 (NVIDIA H200, common.device: auto)", "device: cuda (NVIDIA H200, common.device: cuda)"]


def test_auto_with_an_unusable_nvidia_gpu_warns_why_and_falls_back(monkeypatch, no_cuda, caplog):
    monkeypatch.setattr(H, "nvidia_driver", lambda: "driver 535.104.05")
    with caplog.at_level(logging.INFO, logger="lggseg.runtime"):
        assert H.resolve_device("auto") == torch.device("cpu")
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING and "\n" not in msg
    assert msg.startswith("device: cpu, although an NVIDIA GPU is present:")
    assert "built for CUDA 12.4" in msg and "NVIDIA driver 535.104.05" in msg and msg.endswith("falling back to the CPU")


def test_a_cpu_only_torch_beside_a_gpu_says_so(monkeypatch, no_cuda):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(H, "nvidia_driver", lambda: "driver 535.104.05")
    assert "is a CPU-only build while an NVIDIA GPU is present" in H.cuda_unusable_reason()


def test_cuda_without_cuda_is_a_one_line_config_error(monkeypatch, no_cuda):
    monkeypatch.setattr(H, "nvidia_driver", lambda: "driver 535.104.05")
    with pytest.raises(ConfigError) as err:
        H.resolve_device("cuda")
    msg = str(err.value)
    assert msg.startswith("common.device is 'cuda' but CUDA is unusable: torch") and "\n" not in msg
    assert "CUDA 12.4" in msg and "535.104.05" in msg


@pytest.mark.parametrize("name", ["gpu", "cuda:0", ""])
def test_unknown_device_names_are_config_errors(name):
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        H.resolve_device(name)


def test_a_device_is_returned_as_given():
    assert H.resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)


@pytest.mark.cpu_bf16("auto")
def test_machine_facts_of_a_cpu(monkeypatch):
    monkeypatch.setattr(H, "cpu_name", lambda: "AMD EPYC 9654")
    monkeypatch.setattr(H, "probe_cpu_bf16", lambda: {"supported": True, "native": True})
    assert H.machine_facts(torch.device("cpu"), bf16=True) == {
        "device": "cpu", "device_name": "AMD EPYC 9654", "cpu_name": "AMD EPYC 9654", "cpu_native_bf16": True,
        "bf16_autocast": True, "precision": "bf16 autocast"}
    assert H.machine_facts(torch.device("cpu"), bf16=False)["precision"] == "float32"


def test_machine_facts_record_the_hardware_and_a_forced_switch(monkeypatch):
    """A run under LGGSEG_CPU_BF16=native on a CPU without native bf16 says both (its bf16 was emulated)."""
    monkeypatch.setattr(H, "probe_cpu_bf16", lambda: {"supported": False, "native": False})
    monkeypatch.setenv("LGGSEG_CPU_BF16", "native")
    facts = H.machine_facts(torch.device("cpu"), bf16=True)
    assert (facts["cpu_native_bf16"], facts["cpu_bf16_switch"], facts["precision"]) == (False, "native", "bf16 autocast")


# --------------------------------------------------------------------------- the CPU bf16 switch

NO_BF16 = {"supported": False, "native": False}
EMULATED = {"supported": True, "native": False}  # oneDNN runs bf16 without AVX512-BF16/AMX
NATIVE = {"supported": True, "native": True}


@pytest.mark.parametrize(
    ("env", "probe", "expected"),
    [
        (None, NO_BF16, NO_BF16),  # unset: the probe
        ("", NATIVE, NATIVE),
        ("auto", EMULATED, EMULATED),
        (" Auto ", NATIVE, NATIVE),  # case and spaces are forgiven
        ("native", NO_BF16, NATIVE),  # torch emulates bf16 where the CPU lacks it
        ("native", NATIVE, NATIVE),
        ("off", NATIVE, EMULATED),  # the CPU still runs bf16, but it is not used as native
        ("off", NO_BF16, NO_BF16),
    ],
)
def test_cpu_bf16_follows_the_switch(monkeypatch, env, probe, expected):
    monkeypatch.setattr(H, "probe_cpu_bf16", lambda: dict(probe))
    if env is None:
        monkeypatch.delenv("LGGSEG_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("LGGSEG_CPU_BF16", env)
    assert H.cpu_bf16() == expected


@pytest.mark.parametrize(("flags", "native"), [("fpu avx2 avx512f", False), ("avx512f avx512_bf16", True),
                                                ("amx_bf16 amx_tile", True), (None, False)])
def test_the_probe_reads_the_cpu_flags(monkeypatch, tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(H, "_CPUINFO", cpuinfo)
    assert H.probe_cpu_bf16()["native"] is native


def test_an_unknown_cpu_bf16_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("LGGSEG_CPU_BF16", "on")
    with pytest.raises(ConfigError, match="LGGSEG_CPU_BF16 must be one of auto, native, off, got 'on'"):
        H.cpu_bf16()


@pytest.mark.parametrize(("value", "unsafe"), [(None, False), ("", False), ("off", False), ("unsafe", True),
                                                ("UNSAFE", True)])
def test_channels_last_on_a_cpu_needs_the_unsafe_opt_in(monkeypatch, value, unsafe):
    if value is None:
        monkeypatch.delenv("LGGSEG_CPU_CHANNELS_LAST", raising=False)
    else:
        monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", value)
    assert H.cpu_channels_last_unsafe() is unsafe


@pytest.mark.cpu_bf16("native")
def test_the_marker_sets_the_switch_for_the_test():
    import os

    assert os.environ["LGGSEG_CPU_BF16"] == "native" and H.cpu_bf16()["native"]


def test_software_versions_name_the_libraries():
    v = H.software_versions()
    assert v["torch"] == torch.__version__ and set(v) == {"python", "lggseg", "torch", "torch_cuda", "timm",
                                                          "segmentation_models_pytorch", "numpy",
                                                          "albumentations", "dvclive"}
    assert v["lggseg"] == lggseg.__version__ and v["numpy"] == np.__version__


def test_software_versions_say_none_for_an_absent_optional_library(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "dvclive":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    v = H.software_versions()
    assert v["dvclive"] is None and v["timm"] == real("timm")


def test_git_commit_is_none_outside_a_repository(tmp_path, monkeypatch):
    import subprocess

    assert H.git_commit(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert H.git_commit(tmp_path) is None  # a repository without a commit
    monkeypatch.setattr(H, "COMMIT_FILE", tmp_path / "absent.txt")
    monkeypatch.setattr(H.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert H.git_commit() is None


@pytest.mark.parametrize(("text", "expected"), [
    ("0123456789abcdef0123456789abcdef01234567\n", "0123456789abcdef0123456789abcdef01234567"),
    ("not a commit\n", None),
    ("", None),
])
def test_git_commit_falls_back_to_the_bundled_commit_file(tmp_path, monkeypatch, text, expected):
    """A tree copied without .git (an offline GPU node) records the commit `make bundle` wrote."""
    (tmp_path / "_commit.txt").write_text(text)
    monkeypatch.setattr(H, "COMMIT_FILE", tmp_path / "_commit.txt")
    monkeypatch.chdir(tmp_path)  # not a git repository
    assert H.git_commit() == expected
    assert H.git_commit(tmp_path) is None  # another folder than the package's tree: never the bundled commit


def test_git_commit_of_a_repository(tmp_path):
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head) and H.git_commit(tmp_path) == head


@pytest.mark.parametrize(("record", "expected"), [
    ({"commit": "ab" * 20, "uncommitted_changes": False}, {"commit": "ab" * 20, "uncommitted_changes": False}),
    ({"commit": "ab" * 20, "uncommitted_changes": True}, {"commit": "ab" * 20, "uncommitted_changes": True}),
    ({"commit": "not a commit", "uncommitted_changes": "yes"}, {"commit": None, "uncommitted_changes": None}),
    ({"commit": None, "uncommitted_changes": None}, {"commit": None, "uncommitted_changes": None}),
])
def test_project_origin_in_a_workspace_is_its_origin_file(tmp_path, monkeypatch, record, expected):
    """In a workspace (a git repository of its own) the project commit comes from the origin file that
    lggseg.workspace wrote, never from the workspace's own HEAD."""
    import json
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / H.ORIGIN_FILE).write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    assert H.project_origin() == {**expected, "workspace": True}
    assert H.project_origin(tmp_path) == {**expected, "workspace": True}


def test_project_origin_outside_a_workspace_is_the_git_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(H, "git_commit", lambda cwd=None: "cd" * 20)
    assert H.project_origin() == {"commit": "cd" * 20, "uncommitted_changes": None, "workspace": False}
    (tmp_path / H.ORIGIN_FILE).write_text("{not json")  # a workspace whose origin is unknown, not the git HEAD
    assert H.project_origin() == {"commit": None, "uncommitted_changes": None, "workspace": True}
