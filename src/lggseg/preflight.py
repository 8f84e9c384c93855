"""``lggseg preflight``: does every training variant run on this device, and how fast? (issue #11)

Before hours of ``dvc repro`` on a GPU, each variant of ``params.yaml`` (paper Tables 2-4 and beyond)
is built on the device and put through what training and evaluation do, on synthetic data of the
chosen size (:func:`synthetic_store`, made device-resident and augmented there by
:class:`lggseg.data.resident.ResidentBatches` with the variant's ``train.augment``, as a GPU run trains):
a few optimisation steps with the variant's own loss (:func:`lggseg.training.step.train_step`
under the variant's :func:`~lggseg.training.step.step_setup`: bf16, channels_last, compile), at the epoch where
the outlier term has its full weight, then one evaluation batch through
:func:`lggseg.inference.infer_probabilities`, and again through the model saved by
:func:`lggseg.models.save_model` and rebuilt by :func:`lggseg.models.load_model` (what evaluation reads). Weights are random (``model.pretrained`` is forced off:
nothing is downloaded, and the speed and memory do not depend on the values of the weights).

One line per variant: ``OK`` or ``FAIL`` with the error in one line, the median step time and its
``host`` part (until the batch and the step were queued; on CUDA, a host part close to the step time
means the device waits for Python), the peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per variant); on the CPU the growth
of the process's peak resident set size (``resource.getrusage``), which only counts memory above
the previous variants' peak; and ``ops``, the aten operations one eager training step dispatches,
its batch's augmentation included (:func:`count_step_ops`, views left out): each is at least one kernel launch from the Python thread
on CUDA, so it says how much host work a step costs, whatever the device. ``--overrides`` merges a
YAML of params sections over the params file, as ``lggseg reproduce --overrides`` does (the lease
profile ``params.gpu-lease.yaml``). A failing variant does not stop the others; the exit status is 0 when
all passed, 2 otherwise. Errors in the command line or the params file (an unknown variant) stop
before any model is built.
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
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lggseg.config import (
    ConfigError,
    RunConfig,
    deep_merge,
    load_section,
    read_params,
    resolve_variant,
    variant_names,
)
from lggseg.errors import LggsegError

N_ATTRIBUTES = 16  # width of the synthetic attribute vector (the real one is ~30: one-hot clusters + position)
NATIVE = (256, 256)  # evaluation upsamples to the stored slice size


@dataclass(frozen=True)
class Outcome:
    """One variant's preflight: ``error`` is None when it passed."""

    variant: str
    error: str | None
    step_seconds: float | None = None
    peak_mib: float | None = None
    step_ops: int | None = None
    host_seconds: float | None = None
    save_seconds: float | None = None

    def line(self, width: int) -> str:
        if self.error is not None:
            return f"FAIL {self.variant:<{width}}  {self.error}"
        return (f"OK   {self.variant:<{width}}  step {self.step_seconds:.3f} s  host {self.host_seconds:.3f} s  "
                f"save {self.save_seconds:.2f} s  peak {self.peak_mib:.0f} MiB  ops {self.step_ops}")


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def synthetic_store(n: int, size: int, seed: int = 0) -> SimpleNamespace:
    """What the manifest store holds, made up: ``n`` uint8 ``(size, size, 3)`` noise slices with a brighter
    rectangle each, its mask, and attribute vectors (``images``, ``masks``, ``attributes``)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 160, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        masks[k, y0 : y0 + size // 4, x0 : x0 + size // 3] = 1
    images[masks > 0] += 80
    return SimpleNamespace(images=images, masks=masks, attributes=rng.random((n, N_ATTRIBUTES), dtype=np.float32))


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


def check_variant(run: RunConfig, device: torch.device, image_size: int, batch: int, steps: int) -> Outcome:
    """Build ``run``'s model with random weights on ``device`` and take ``steps`` training steps and one evaluation batch."""
    from lggseg.data.resident import ResidentBatches
    from lggseg.inference import infer_probabilities
    from lggseg.losses import CompoundLoss, full_gamma_epoch
    from lggseg.models import build_model, load_model, save_model
    from lggseg.training.step import adam, applied, step_setup, train_step

    cuda = device.type == "cuda"
    setup = step_setup(run.train, device)
    model = optimizer = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _peak_rss_mib()
        with applied(setup, device):
            torch.manual_seed(0)
            model_cfg = dataclasses.replace(run.model, pretrained=False, weights_file=None)
            memory_format = torch.channels_last if setup.channels_last else torch.contiguous_format
            model = build_model(model_cfg, N_ATTRIBUTES, image_size).to(device, memory_format=memory_format)
            net = torch.compile(model) if setup.compile else model
            optimizer = adam(model.parameters(), run.train)
            loss_fn = CompoundLoss(run.loss, run.train.epochs).to(device)
            epoch = full_gamma_epoch(run.loss, run.train.epochs)  # the outlier term at full weight
            # the training data path of a GPU run: the split on the device, augmented there in whole batches
            batches = ResidentBatches(synthetic_store(batch * (steps + 1), image_size), np.arange(batch * (steps + 1)),
                                      image_size, device, batch, augment=run.train.augment, shuffle=True,
                                      drop_last=True)

            def step(net: torch.nn.Module, b: dict[str, torch.Tensor], opt: Any = optimizer) -> torch.Tensor:
                x = b["image"].contiguous(memory_format=memory_format)
                attrs = b["attributes"] if run.model.attributes else None
                return train_step(net, opt, loss_fn, x, b["mask"], attrs, epoch, setup.bf16)[1]

            net.train()
            times, host = [], []
            it = iter(batches)
            for _ in range(steps):
                t0 = time.perf_counter()
                total = step(net, next(it))
                t1 = time.perf_counter()  # everything is queued: on CUDA the rest is the host waiting for the device
                if not torch.isfinite(total):  # waits for the device, so the time is the step's
                    raise FloatingPointError(f"the loss is {float(total)}")
                times.append(time.perf_counter() - t0)
                host.append(t1 - t0)
            # the eager model (compiled code launches fewer, fused kernels), after the timed steps (warm caches);
            # the batch is made inside, as in training
            ops = sum(count_step_ops(lambda eager=model: step(eager, next(it))).values())
            net.eval()
            evaluation = next(iter(batches.view(batch)))  # evaluation mode: no augmentation
            x = evaluation["image"].contiguous(memory_format=memory_format)
            attrs = evaluation["attributes"] if run.model.attributes else None
            prob = infer_probabilities(net, x, attrs, out_size=NATIVE)
            if tuple(prob.shape) != (batch, *NATIVE) or not torch.isfinite(prob).all():
                raise ValueError(f"evaluation gave probabilities of shape {tuple(prob.shape)}, finite: "
                                 f"{bool(torch.isfinite(prob).all())}")
            # what evaluation reads: the model saved after training, rebuilt from its files
            with tempfile.TemporaryDirectory(prefix="lggseg-preflight-") as tmp:
                t0 = time.perf_counter()
                save_model(model, tmp, {"variant": run.variant, "preflight": True})
                save_seconds = time.perf_counter() - t0
                loaded, _ = load_model(tmp, device)
            again = infer_probabilities(loaded.to(memory_format=memory_format), x, attrs, out_size=NATIVE)
            if not torch.allclose(again, prob, atol=1e-3):
                raise ValueError(f"the saved and reloaded model predicts differently (max difference "
                                 f"{float((again - prob).abs().max()):.2g})")
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib() - rss0
        # the first step builds caches (cuDNN autotuning, compilation); the median ignores it
        return Outcome(run.variant, None, statistics.median(times[1:] or times), peak, ops,
                       statistics.median(host[1:] or host), save_seconds)
    except Exception as exc:  # noqa: BLE001 - every failure of a variant is reported, the others still run
        return Outcome(run.variant, _one_line(exc))
    finally:
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def preflight(params: dict[str, Any], variants: Sequence[str] | None, device: torch.device, image_size: int | None,
              batch_size: int | None, steps: int = 3, out: Any = None) -> list[Outcome]:
    """Check ``variants`` (all when None) of ``params``; prints one line each to ``out`` (stdout) as they finish."""
    out = out or sys.stdout
    names = list(variants) if variants else variant_names(params)
    runs = [resolve_variant(params, name) for name in names]  # every config error before any model
    size = image_size or runs[0].common.image_size
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "growth of the process's peak RSS"
    print(f"preflight: {len(runs)} variant(s) on {device} at {size} px, {steps} steps each, random init "
          f"(model.pretrained forced off), device-resident augmented batches; step = median time, host = its "
          f"part until all was queued, save = writing the model (then reloaded and evaluated again), "
          f"peak = {memory}, ops = aten ops dispatched by one eager step and its batch",
          file=out, flush=True)
    width = max(len(n) for n in names)
    outcomes = []
    for run in runs:
        try:  # e.g. U-Net at a size not divisible by 32: this variant fails, the others run
            run = dataclasses.replace(run, common=dataclasses.replace(run.common, image_size=size))
        except ConfigError as exc:
            outcome = Outcome(run.variant, _one_line(exc))
        else:
            outcome = check_variant(run, device, size, batch_size or run.train.batch_size, steps)
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
