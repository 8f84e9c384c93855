"""``lggseg preflight``: a line per variant (OK with step time and peak memory, or FAIL with the error),
exit 0 only when all pass, a broken variant does not stop the others, bad arguments stop at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lggseg.cli import main as cli_main
from lggseg.config import read_params
from lggseg.preflight import count_step_ops, main

REPO = Path(__file__).resolve().parents[1]
SMALL = {"encoder": "test_efficientnet", "pretrained": True, "decoder_channels": 32, "attribute_hidden": 16}


def _params(tmp_path: Path, variants: dict) -> Path:
    """params.yaml with tiny encoders (``pretrained: true`` on purpose: preflight must switch it off)."""
    params = read_params(REPO / "params.yaml")
    params["common"]["device"] = "cpu"
    params["model"].update(SMALL)
    params["train"].update({"cpu_threads": 1})
    params["variants"] = variants
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))  # keep the variants in their order
    return path


TINY = {
    "attr_outlier": {"loss": {"terms": ["bce", "dice", "outlier"]}},
    "plain_isolated": {"model": {"attributes": False}, "loss": {"terms": ["bce", "outlier"], "outlier_mode": "isolated_bce"}},
}


def test_all_variants_pass(tmp_path, capsys):
    path = _params(tmp_path, TINY)
    assert main(["--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "random init (model.pretrained forced off)" in out[0] and "peak RSS" in out[0] and "64 px" in out[0]
    assert len(out) == 3
    for line, name in zip(out[1:], TINY, strict=True):
        assert re.fullmatch(rf"OK   {name} +step \d+\.\d{{3}} s  host \d+\.\d{{3}} s  save \d+\.\d\d s  "
                            rf"peak -?\d+ MiB  ops \d+", line), line
        step, host, _ = (float(v) for v in re.findall(r"(\d+\.\d+) s", line))
        assert 0 < host <= step
    # the outlier term and the attribute branch add operations to the step
    ops = {name: int(line.split("ops ")[1]) for line, name in zip(out[1:], TINY, strict=True)}
    assert ops["attr_outlier"] > 100 and ops["plain_isolated"] > 100


def test_a_broken_variant_fails_alone_with_exit_2(tmp_path, capsys):
    variants = {"broken": {"model": {"encoder": "no_such_encoder_xyz"}}, **TINY}
    path = _params(tmp_path, variants)
    code = cli_main(["preflight", "--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "1",
                     "--variants", "broken,attr_outlier"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.out.splitlines()[1:]
    assert lines[0].startswith("FAIL broken") and "no_such_encoder_xyz" in lines[0]
    assert lines[1].startswith("OK   attr_outlier")  # still run after the failure
    assert "1 of 2 variant(s) failed: broken" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "nope"], "unknown variant 'nope'"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--image-size", "50"], "multiple of 16"),
    ],
)
def test_bad_arguments_stop_before_any_model(tmp_path, capsys, argv, message):
    path = _params(tmp_path, TINY)
    assert main(["--params", str(path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1


def test_unet_at_a_size_not_divisible_by_32_fails_alone(tmp_path, capsys):
    path = _params(tmp_path, {"unet": {"model": {"arch": "unet", "encoder": "test_efficientnet", "attributes": False}},
                              **TINY})
    assert main(["--params", str(path), "--image-size", "48", "--batch-size", "2", "--steps", "1"]) == 2
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].startswith("FAIL unet") and "divisible by 32" in lines[0]
    assert all(line.startswith("OK") for line in lines[1:]) and len(lines) == 3


@pytest.mark.slow
def test_every_variant_of_params_yaml_runs_on_cpu_at_64px(capsys):
    code = main(["--params", str(REPO / "params.yaml"), "--device", "cpu", "--image-size", "64", "--batch-size", "2",
                 "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sum(line.startswith("OK ") for line in out.splitlines()) == 12


def test_the_lease_profile_runs_through_overrides(tmp_path, capsys):
    """params.gpu-lease.yaml merged over the params file (its device: cuda overridden by --device cpu)."""
    lease = read_params(REPO / "params.gpu-lease.yaml")
    assert lease["model"]["pretrained"] is False and lease["train"]["fused_adam"] is True
    assert lease["train"]["compile"] is False and lease["train"]["checkpoint_every"] >= 100
    path = _params(tmp_path, {"attr_outlier": TINY["attr_outlier"]})
    assert main(["--params", str(path), "--overrides", str(REPO / "params.gpu-lease.yaml"), "--device", "cpu",
                 "--image-size", "64", "--batch-size", "2", "--steps", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("OK   attr_outlier")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {fused_adam: maybe}\n")
    assert main(["--params", str(path), "--overrides", str(bad), "--device", "cpu"]) == 2
    assert "train.fused_adam" in capsys.readouterr().err


@pytest.mark.parametrize(("step", "expected"), [
    (lambda: torch.ones(3) + 1, {"aten::ones": 1, "aten::add.Tensor": 1}),
    (lambda: torch.ones(3).view(3, 1).t() * 2, {"aten::ones": 1, "aten::mul.Tensor": 1}),  # views left out
    (lambda: None, {}),
])
def test_count_step_ops(step, expected):
    assert dict(count_step_ops(step)) == expected


def test_count_step_ops_counts_the_backward_pass():
    w = torch.ones(3, requires_grad=True)
    forward = count_step_ops(lambda: (w * 2).sum())
    both = count_step_ops(lambda: (w * 2).sum().backward())
    assert sum(both.values()) > sum(forward.values())


def test_a_model_that_does_not_reload_the_same_fails(tmp_path, capsys, monkeypatch):
    import lggseg.models as M

    real = M.load_model

    def reinitialised(model_dir, device="cpu"):
        model, meta = real(model_dir, device)
        for p in model.parameters():
            torch.nn.init.normal_(p)  # as if the weights were lost on the way
        return model, meta

    monkeypatch.setattr(M, "load_model", reinitialised)
    path = _params(tmp_path, {"attr_outlier": TINY["attr_outlier"]})
    assert main(["--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "1"]) == 2
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("FAIL attr_outlier") and "predicts differently" in line
