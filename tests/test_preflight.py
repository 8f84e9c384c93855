"""``lggseg preflight``: a line per variant (OK with step time and peak memory, or FAIL with the phase that
failed and the error), exit 0 only when all pass, a broken variant does not stop the others, bad arguments
stop at once; validation and evaluation really run, and the steps run on the variant's stream."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
import yaml

from lggseg.cli import main as cli_main
from lggseg.config import read_params
from lggseg.preflight import PHASES, check_variant, count_step_ops, main

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
                            rf"peak -?\d+ MiB  ops \d+  val dice [01]\.\d{{3}}  test dice [01]\.\d{{3}}  "
                            rf"passed build,train,val,save/reload,evaluate", line), line
        step, host, _ = (float(v) for v in re.findall(r"(\d+\.\d+) s", line))
        assert 0 < host <= step
    # the outlier term and the attribute branch add operations to the step
    ops = {name: int(re.search(r"ops (\d+)", line)[1]) for line, name in zip(out[1:], TINY, strict=True)}
    assert ops["attr_outlier"] > 100 and ops["plain_isolated"] > 100


def test_a_broken_variant_fails_alone_with_exit_2(tmp_path, capsys):
    variants = {"broken": {"model": {"encoder": "no_such_encoder_xyz"}}, **TINY}
    path = _params(tmp_path, variants)
    code = cli_main(["preflight", "--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "1",
                     "--variants", "broken,attr_outlier"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.out.splitlines()[1:]
    assert lines[0].startswith("FAIL broken") and "FAILED build: " in lines[0] and "no_such_encoder_xyz" in lines[0]
    assert "passed" not in lines[0] and "step" not in lines[0]  # nothing ran, nothing measured but the memory
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
    assert lines[0].startswith("FAIL unet") and "FAILED config: ConfigError" in lines[0] and "divisible by 32" in lines[0]
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
    assert "passed build,train,val  FAILED save/reload: ValueError" in line


def _run(tmp_path: Path, name: str = "attr_outlier"):
    from lggseg.config import deep_merge, resolve_variant

    params = read_params(_params(tmp_path, {name: TINY[name]}))
    return resolve_variant(deep_merge(params, {"common": {"image_size": 64}}), name)


def test_a_variant_whose_evaluation_fails_is_reported_with_the_phase_and_the_others_run(tmp_path, capsys, monkeypatch):
    import lggseg.evaluation.evaluate as E

    real = E.evaluate_model

    def broken_for_one(model_dirs, *args, **kwargs):
        if Path(model_dirs).name == "attr_outlier":
            raise RuntimeError("the evaluation broke")
        return real(model_dirs, *args, **kwargs)

    monkeypatch.setattr(E, "evaluate_model", broken_for_one)
    path = _params(tmp_path, TINY)
    assert main(["--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "1"]) == 2
    captured = capsys.readouterr()
    first, second = captured.out.splitlines()[1:]
    assert re.match(r"FAIL attr_outlier +step ", first)  # what the phases before it measured is still shown
    assert first.endswith("passed build,train,val,save/reload  FAILED evaluate: RuntimeError: the evaluation broke")
    assert "val dice" in first and "test dice" not in first
    assert second.startswith("OK   plain_isolated") and second.endswith("passed " + ",".join(PHASES))
    assert "1 of 2 variant(s) failed: attr_outlier" in captured.err


def test_validation_and_evaluation_really_run(tmp_path, monkeypatch):
    """The outcome carries what the trainer's validation and evaluate_model returned, on the synthetic splits."""
    import lggseg.evaluation.evaluate as E
    import lggseg.training.trainer as T

    seen: dict = {}
    real_val, real_eval = T.validation_sums, E.evaluate_model

    def val_spy(net, data, loss_fn, epoch, bf16):
        seen["val"] = real_val(net, data, loss_fn, epoch, bf16)
        return seen["val"]

    def eval_spy(model_dirs, store, cfg, post, device):
        seen["seed dirs"] = sorted(p.name for p in Path(model_dirs).iterdir())
        seen["test rows"] = store.indices("test")
        seen["eval"] = real_eval(model_dirs, store, cfg, post, device)
        return seen["eval"]

    monkeypatch.setattr(T, "validation_sums", val_spy)
    monkeypatch.setattr(E, "evaluate_model", eval_spy)
    run = _run(tmp_path)
    outcome = check_variant(run, torch.device("cpu"), 64, 2, 1)
    assert outcome.error is None and outcome.phase is None and outcome.passed == PHASES
    loss_sum, dice_sum, n = (float(v) for v in seen["val"])
    assert outcome.val_slices == n == 2  # one val batch
    assert outcome.val_dice == pytest.approx(dice_sum / n) and 0 <= outcome.val_dice <= 1
    assert seen["seed dirs"] == [f"seed_{run.seeds[0]}"]  # the layout of models/<variant>/, as reproduce has it
    metrics = seen["eval"].metrics
    assert outcome.test_slices == metrics["n_test_slices"] == len(seen["test rows"]) == 2
    assert outcome.test_dice == metrics["dice_slice_mean"]
    assert set(seen["eval"].slices["row"]) == set(seen["test rows"].tolist())


def test_the_steps_run_on_the_variants_stream(tmp_path, monkeypatch):
    """On the CPU there is no stream: a fake one shows that build, train, val and save run inside it, as
    train_variants runs a variant, and evaluation after it (outside every run's stream, as reproduce does)."""
    import lggseg.evaluation.evaluate as E
    import lggseg.models as M
    import lggseg.training.concurrent as C
    import lggseg.training.step as S
    import lggseg.training.trainer as T

    stream = object()
    current: list = [None]  # the stream entered now
    calls: dict[str, list] = {"stream": [], "train_step": [], "validation": [], "save": [], "evaluate": []}

    def side_stream(device):
        calls["stream"].append(device)
        return stream

    @contextlib.contextmanager
    def on_stream(s):
        current[0] = s
        try:
            yield
        finally:
            current[0] = None

    def recording(name, real):
        def wrapper(*args, **kwargs):
            calls[name].append(current[0])
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(C, "side_stream", side_stream)
    monkeypatch.setattr(C, "on_stream", on_stream)
    for module, attr, name in ((S, "train_step", "train_step"), (T, "validation_sums", "validation"),
                               (M, "save_model", "save"), (E, "evaluate_model", "evaluate")):
        monkeypatch.setattr(module, attr, recording(name, getattr(module, attr)))
    outcome = check_variant(_run(tmp_path), torch.device("cpu"), 64, 2, 2)
    assert outcome.error is None, outcome.error
    assert calls["stream"] == [torch.device("cpu")]
    assert calls["train_step"] == [stream] * 3  # 2 timed steps + the one whose ops are counted
    assert calls["validation"] == [stream] and calls["save"] == [stream]
    assert calls["evaluate"] == [None]
