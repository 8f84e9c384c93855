"""``lggseg preflight``: does every training variant run on this device, and how fast? (issues #11, #20)

Before hours of ``dvc repro`` on a GPU, or the minutes of a GPU lease, each variant of ``params.yaml``
(paper Tables 2-4 and beyond) goes through the phases of a real run, on a small synthetic manifest store
(:func:`synthetic_store`: train, val and test slices at the stored 256 x 256, several patients) resized
to the chosen image size, with random weights (``model.pretrained`` is forced off: nothing is
downloaded, and the speed and memory do not depend on the values of the weights):

``build``
    the batches of :func:`lggseg.training.batches.make_batches` (the device-resident path of
    :mod:`lggseg.data.resident`: the splits on the device, the train batches augmented there with the
    variant's ``train.augment``), the network, Adam and the variant's loss;
``train``
    a few optimisation steps (:func:`lggseg.training.step.train_step` under the variant's
    :func:`~lggseg.training.step.step_setup`: bf16, channels_last, compile) at the epoch where the
    outlier term has its full weight;
``val``
    :func:`lggseg.training.trainer.validation_sums` on the val slices, what
    :meth:`~lggseg.training.trainer.Trainer.end_epoch` validates with;
``save/reload``
    the model written by :func:`lggseg.models.save_model` into ``<variant>/seed_<s>/`` and rebuilt by
    :func:`lggseg.models.load_model`, which must predict what the trained one predicts;
``evaluate``
    :func:`lggseg.evaluation.evaluate.evaluate_model` on that folder and the test slices, as
    ``lggseg evaluate`` and ``lggseg reproduce`` call it (the params' ``evaluate`` and ``postprocess``).

As :func:`lggseg.training.concurrent.train_variants` runs a variant, build, train, val and save/reload
run under its step set-up and, on CUDA, on a side stream of its own
(:func:`~lggseg.training.concurrent.side_stream`); evaluation runs after them on the default stream.

One line per variant: ``OK`` or ``FAIL``; the median step time and its ``host`` part (until the batch
and the step were queued; on CUDA, a host part close to the step time means the device waits for
Python), the save time, the peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per
variant); on the CPU the growth of the process's peak resident set size (``resource.getrusage``),
which only counts memory above the previous variants' peak; ``ops``, the aten operations one eager
training step dispatches, its batch's augmentation included (:func:`count_step_ops`, views left out):
each is at least one kernel launch from the Python thread on CUDA, so it says how much host work a
step costs, whatever the device; the val and test Dice (of random weights after a few steps: they only
show that the phase ran); the phases passed and, for a FAIL, the phase that failed and its error in
one line. ``--overrides`` merges a YAML of params sections over the params file, as ``lggseg
reproduce --overrides`` does (the lease profile ``params.gpu-lease.yaml``). A failing variant does not
stop the others; the exit status is 0 when all passed, 2 otherwise. Errors in the command line or
the params file (an unknown variant, a bad ``evaluate`` section) stop before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from lggseg.config import (
    ConfigError,
    EvaluateConfig,
    PostprocessConfig,
    RunConfig,
    deep_merge,
    load_section,
    read_params,
    resolve_variant,
    variant_names,
)
from lggseg.errors import LggsegError

if TYPE_CHECKING:
    from lggseg.data.store import Store

N_ATTRIBUTES = 16  # width of the synthetic attribute vector (the real one is ~30: one-hot clusters + position)
NATIVE = 256  # the stored slice size (the Kaggle data's); every image size is resized from it, as in a real store
PATIENTS_PER_SPLIT = 2
PHASES = ("build", "train", "val", "save/reload", "evaluate")


@dataclass(frozen=True)
class Outcome:
    """One variant's preflight: ``error`` is None when it passed; ``phase`` is the one that failed.

    ``passed``: the :data:`PHASES` that passed, in order; the measurements are those of the phases
    that got that far (``val_dice``/``val_slices``: validation's Dice over its slices; ``test_dice``
    and ``test_slices``: ``dice_slice_mean`` and ``n_test_slices`` of the evaluation's metrics).
    """

    variant: str
    error: str | None
    phase: str | None = None
    passed: tuple[str, ...] = ()
    step_seconds: float | None = None
    host_seconds: float | None = None
    step_ops: int | None = None
    val_dice: float | None = None
    val_slices: int | None = None
    save_seconds: float | None = None
    test_dice: float | None = None
    test_slices: int | None = None
    peak_mib: float | None = None

    def line(self, width: int) -> str:
        fields = []
        if self.step_seconds is not None:
            fields.append(f"step {self.step_seconds:.3f} s  host {self.host_seconds:.3f} s")
        if self.save_seconds is not None:
            fields.append(f"save {self.save_seconds:.2f} s")
        if self.peak_mib is not None:
            fields.append(f"peak {self.peak_mib:.0f} MiB")
        if self.step_ops is not None:
            fields.append(f"ops {self.step_ops}")
        if self.val_dice is not None:
            fields.append(f"val dice {self.val_dice:.3f}")
        if self.test_dice is not None:
            fields.append(f"test dice {self.test_dice:.3f}")
        if self.passed:
            fields.append(f"passed {','.join(self.passed)}")
        if self.error is not None:
            fields.append(f"FAILED {self.phase}: {self.error}")
        return f"{'OK  ' if self.error is None else 'FAIL'} {self.variant:<{width}}  {'  '.join(fields)}"


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def synthetic_store(n_train: int, n_val: int, n_test: int, seed: int = 0) -> Store:
    """A manifest store made up in memory: uint8 ``(NATIVE, NATIVE, 3)`` noise slices, a brighter
    rectangle in three of every four with its mask (the fourth is tumour-free), attribute vectors,
    and the table the pipeline reads (``row``, ``patient_id``, ``case_id``, ``slice_index``, ``split``,
    ``tumour_pixels``), each split's slices spread over :data:`PATIENTS_PER_SPLIT` patients."""
    from lggseg.data.store import Store

    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    images = rng.integers(0, 160, (n, NATIVE, NATIVE, 3), dtype=np.uint8)
    masks = np.zeros((n, NATIVE, NATIVE), np.uint8)
    for k in range(n):
        if k % 4 != 3:
            y0, x0 = rng.integers(0, NATIVE // 2, 2)
            masks[k, y0 : y0 + NATIVE // 4, x0 : x0 + NATIVE // 3] = 1
    images[masks > 0] += 80
    split = np.repeat(["train", "val", "test"], [n_train, n_val, n_test])
    position = np.concatenate([np.arange(m) for m in (n_train, n_val, n_test)])
    patient = np.char.add(np.char.add("SYN_", split), np.char.add("_", (position % PATIENTS_PER_SPLIT).astype(str)))
    table = pd.DataFrame({"row": np.arange(n), "patient_id": patient, "case_id": np.char.add(patient, "_1"),
                          "slice_index": position // PATIENTS_PER_SPLIT + 1, "split": split,
                          "tumour_pixels": masks.reshape(n, -1).sum(1).astype(np.int64)})
    names = [f"synthetic_{k}" for k in range(N_ATTRIBUTES)]
    meta = {"source": "preflight (synthetic)", "fingerprint": None, "split_unit": "patient", "split_seed": None,
            "n_slices": n, "height": NATIVE, "width": NATIVE, "attribute_names": names}
    return Store(Path("preflight-synthetic"), table, images, masks, names,
                 rng.random((n, N_ATTRIBUTES), dtype=np.float32), meta)


def count_step_ops(step: Callable[[], Any]) -> Counter[str]:
    """The aten operations that ``step()`` (one training step) dispatches, by name, views left out.

    Counted by a ``TorchDispatchMode`` (autograd's backward included): with eager execution each
    operation is at least one kernel launch from the host thread, so the total is the host's share of
    a step's cost that no faster GPU removes (issue #20: ~1,800 per regnetz step was an estimate).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        step()
    return counts


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_variant(run: RunConfig, device: torch.device, image_size: int, batch: int, steps: int,
                  evaluate: EvaluateConfig | None = None, post: PostprocessConfig | None = None) -> Outcome:
    """``run``'s phases (:data:`PHASES`) with random weights on ``device``: ``steps`` training steps of
    ``batch`` images at ``image_size``, validation, save and reload, evaluation under ``evaluate`` and
    ``post`` (their defaults when None)."""
    from lggseg.evaluation.evaluate import evaluate_model
    from lggseg.inference import infer_probabilities
    from lggseg.losses import CompoundLoss, full_gamma_epoch
    from lggseg.models import build_model, load_model, save_model
    from lggseg.runtime import DistInfo
    from lggseg.training.batches import make_batches
    from lggseg.training.concurrent import on_stream, side_stream
    from lggseg.training.step import adam, applied, step_setup, train_step
    from lggseg.training.trainer import validation_sums

    cuda = device.type == "cuda"
    seed = run.seeds[0]
    # the GPU's data path (the epoch draw of empty_slice_fraction/epoch_slices exists only on the loader's)
    data_path = "loader" if run.train.subsamples_epochs else "resident"
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=batch, data_path=data_path))
    setup = step_setup(run.train, device)
    passed: list[str] = []
    got: dict[str, Any] = {}
    phase = PHASES[0]
    model = net = optimizer = data = loaded = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _peak_rss_mib()
    try:
        with tempfile.TemporaryDirectory(prefix="lggseg-preflight-") as tmp:
            # steps timed + one counted, of whole batches; one val batch; the test slices of one eval batch
            store = synthetic_store(batch * (steps + 1), batch, batch)
            stream = side_stream(device)
            with applied(setup, device), on_stream(stream):
                torch.manual_seed(seed)
                data = make_batches(run, store, store.root, seed, DistInfo(0, 1, 0, device), setup.channels_last,
                                    f"preflight {run.variant}")
                model_cfg = dataclasses.replace(run.model, pretrained=False, weights_file=None)
                model = build_model(model_cfg, data.n_attributes, image_size).to(device, memory_format=data.memory_format)
                net = torch.compile(model) if setup.compile else model
                optimizer = adam(model.parameters(), run.train)
                loss_fn = CompoundLoss(run.loss, run.train.epochs).to(device)
                epoch = full_gamma_epoch(run.loss, run.train.epochs)  # the outlier term at full weight
                passed.append(phase)

                phase = "train"
                data.sampler.set_epoch(epoch)
                batches = iter(data.train)

                def step(net: torch.nn.Module) -> torch.Tensor:
                    x, y, a = data.to_device(next(batches))
                    return train_step(net, optimizer, loss_fn, x, y, a, epoch, setup.bf16)[1]

                net.train()
                times, host = [], []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    total = step(net)
                    t1 = time.perf_counter()  # everything is queued: on CUDA the rest is the host waiting for the device
                    if not torch.isfinite(total):  # waits for the device, so the time is the step's
                        raise FloatingPointError(f"the loss is {float(total)}")
                    times.append(time.perf_counter() - t0)
                    host.append(t1 - t0)
                # the first step builds caches (cuDNN autotuning, compilation); the median ignores it
                got.update(step_seconds=statistics.median(times[1:] or times),
                           host_seconds=statistics.median(host[1:] or host))
                # the eager model (compiled code launches fewer, fused kernels), after the timed steps (warm
                # caches); the batch is made inside, as in training
                got["step_ops"] = sum(count_step_ops(lambda: step(model)).values())
                passed.append(phase)

                phase = "val"
                loss_sum, dice_sum, n = (float(v) for v in validation_sums(net, data, loss_fn, epoch, setup.bf16))
                if n != len(store.indices("val")) or not (np.isfinite(loss_sum) and 0 <= dice_sum <= n):
                    raise ValueError(f"validation gave loss sum {loss_sum}, Dice sum {dice_sum} over {n:g} slices")
                got.update(val_dice=dice_sum / n, val_slices=int(n))
                passed.append(phase)

                phase = "save/reload"
                x, _, a = data.to_device(next(iter(data.val)))
                prob = infer_probabilities(net, x, a, out_size=(NATIVE, NATIVE))
                if tuple(prob.shape) != (len(x), NATIVE, NATIVE) or not torch.isfinite(prob).all():
                    raise ValueError(f"inference gave probabilities of shape {tuple(prob.shape)}, finite: "
                                     f"{bool(torch.isfinite(prob).all())}")
                # where evaluation looks for it: <models>/<variant>/seed_<s>/
                t0 = time.perf_counter()
                save_model(model, Path(tmp, run.variant, f"seed_{seed}"),
                           {"variant": run.variant, "seed": seed, "preflight": True, "image_size": image_size,
                            "attribute_names": list(store.attribute_names), "n_attributes": data.n_attributes})
                got["save_seconds"] = time.perf_counter() - t0
                loaded, _ = load_model(Path(tmp, run.variant, f"seed_{seed}"), device)
                again = infer_probabilities(loaded.to(memory_format=data.memory_format), x, a, out_size=(NATIVE, NATIVE))
                if not torch.allclose(again, prob, atol=1e-3):
                    raise ValueError(f"the saved and reloaded model predicts differently (max difference "
                                     f"{float((again - prob).abs().max()):.2g})")
                passed.append(phase)
            if cuda:
                torch.cuda.synchronize(device)  # the side stream's work is done before the default stream's

            phase = "evaluate"  # as lggseg reproduce evaluates a trained variant: after its turns
            metrics = evaluate_model(Path(tmp, run.variant), store, evaluate or EvaluateConfig(),
                                     post or PostprocessConfig(), device).metrics
            n_test = len(store.indices("test"))
            if metrics.get("n_test_slices") != n_test or metrics.get("dice_slice_mean") is None:
                raise ValueError(f"evaluation scored {metrics.get('n_test_slices')} of {n_test} test slices, "
                                 f"Dice {metrics.get('dice_slice_mean')}")
            got.update(test_dice=metrics["dice_slice_mean"], test_slices=n_test)
            passed.append(phase)
        error = None
    except Exception as exc:  # noqa: BLE001 - every failure of a variant is reported, the others still run
        error = _one_line(exc)
    finally:
        got["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib() - rss0
        model = net = optimizer = data = loaded = None  # their memory goes before the next variant's
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return Outcome(run.variant, error, None if error is None else phase, tuple(passed), **got)


def preflight(params: dict[str, Any], variants: Sequence[str] | None, device: torch.device, image_size: int | None,
              batch_size: int | None, steps: int = 3, out: Any = None) -> list[Outcome]:
    """Check ``variants`` (all when None) of ``params``; prints one line each to ``out`` (stdout) as they finish."""
    out = out or sys.stdout
    names = list(variants) if variants else variant_names(params)
    runs = [resolve_variant(params, name) for name in names]  # every config error before any model
    evaluate, post = load_section("evaluate", params), load_section("postprocess", params)
    size = image_size or runs[0].common.image_size
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "growth of the process's peak RSS"
    print(f"preflight: {len(runs)} variant(s) on {device} at {size} px, {steps} steps each, random init "
          f"(model.pretrained forced off), synthetic store, device-resident augmented batches; phases "
          f"{', '.join(PHASES)}; step = median time, host = its part until all was queued, save = writing "
          f"the model, peak = {memory}, ops = aten ops dispatched by one eager step and its batch, "
          f"val/test dice of the random model (the phase ran)", file=out, flush=True)
    width = max(len(n) for n in names)
    outcomes = []
    for run in runs:
        try:  # e.g. U-Net at a size not divisible by 32: this variant fails, the others run
            run = dataclasses.replace(run, common=dataclasses.replace(run.common, image_size=size))
        except ConfigError as exc:
            outcome = Outcome(run.variant, _one_line(exc), "config")
        else:
            outcome = check_variant(run, device, size, batch_size or run.train.batch_size, steps, evaluate, post)
        print(outcome.line(width), file=out, flush=True)
        outcomes.append(outcome)
    return outcomes


def build_parser(prog: str = "lggseg preflight") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--variants", help="comma-separated variant names (default: all of the params file)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overrides", help="YAML of params sections merged over the params file (e.g. params.gpu-lease.yaml)")
    ap.add_argument("--image-size", type=int, help="input size (default: common.image_size)")
    ap.add_argument("--device", help="auto | cpu | cuda (default: common.device)")
    ap.add_argument("--batch-size", type=int, help="images per step (default: each variant's train.batch_size)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant (default 3)")
    return ap


def main(argv: list[str] | None = None, prog: str = "lggseg preflight") -> int:
    import logging

    from lggseg.config import CommonConfig
    from lggseg.runtime import resolve_device

    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("lggseg").setLevel(logging.INFO)
    try:
        if args.batch_size is not None and args.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (BatchNorm in training mode), got {args.batch_size}")
        if args.steps < 1:
            raise ConfigError(f"--steps must be positive, got {args.steps}")
        if args.image_size is not None:
            CommonConfig(image_size=args.image_size)  # the same rule as common.image_size
        params = read_params(args.params)
        if args.overrides:
            params = deep_merge(params, read_params(args.overrides))
        variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
        device = resolve_device(args.device or load_section("common", params).device)
        outcomes = preflight(params, variants, device, args.image_size, args.batch_size, args.steps)
    except LggsegError as exc:
        print(f"preflight: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    failed = [o.variant for o in outcomes if o.error is not None]
    if failed:
        print(f"preflight: {len(failed)} of {len(outcomes)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
