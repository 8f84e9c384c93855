"""``lggseg preflight``: does every training variant run on this device, and how fast? (issue #11)

Before hours of ``dvc repro`` on a GPU, each variant of ``params.yaml`` (paper Tables 2-4 and beyond)
is built on the device and put through what training and evaluation do, on synthetic data of the
chosen size: a few optimisation steps with the variant's own loss (:func:`lggseg.training.step.train_step`
under the variant's :func:`~lggseg.training.step.step_setup`: bf16, channels_last, compile), at the epoch where
the outlier term has its full weight, then one evaluation batch through
:func:`lggseg.inference.infer_probabilities`. Weights are random (``model.pretrained`` is forced off:
nothing is downloaded, and the speed and memory do not depend on the values of the weights).

One line per variant: ``OK`` or ``FAIL`` with the error in one line, the median step time and the
peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per variant); on the CPU the growth
of the process's peak resident set size (``resource.getrusage``), which only counts memory above
the previous variants' peak. A failing variant does not stop the others; the exit status is 0 when
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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lggseg.config import ConfigError, RunConfig, load_section, read_params, resolve_variant, variant_names
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

    def line(self, width: int) -> str:
        if self.error is not None:
            return f"FAIL {self.variant:<{width}}  {self.error}"
        return f"OK   {self.variant:<{width}}  step {self.step_seconds:.3f} s  peak {self.peak_mib:.0f} MiB"


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _synthetic(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A normalised image batch, masks with a rectangle each, and attribute vectors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.zeros(batch, 1, size, size)
    for k in range(batch):
        y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        y[k, 0, y0 : y0 + size // 4, x0 : x0 + size // 3] = 1
    a = torch.rand(batch, N_ATTRIBUTES, generator=g)
    return x.to(device), y.to(device), a.to(device)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_variant(run: RunConfig, device: torch.device, image_size: int, batch: int, steps: int) -> Outcome:
    """Build ``run``'s model with random weights on ``device`` and take ``steps`` training steps and one evaluation batch."""
    from lggseg.inference import infer_probabilities
    from lggseg.losses import CompoundLoss, full_gamma_epoch
    from lggseg.models import build_model
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
            x, y, a = _synthetic(batch, image_size, device)
            x = x.contiguous(memory_format=memory_format)
            attrs = a if run.model.attributes else None
            net.train()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                _, total, _ = train_step(net, optimizer, loss_fn, x, y, attrs, epoch, setup.bf16)
                if not torch.isfinite(total):  # also waits for the device, so the time is the step's
                    raise FloatingPointError(f"the loss is {float(total)}")
                times.append(time.perf_counter() - t0)
            net.eval()
            prob = infer_probabilities(net, x, attrs, out_size=NATIVE)
            if tuple(prob.shape) != (batch, *NATIVE) or not torch.isfinite(prob).all():
                raise ValueError(f"evaluation gave probabilities of shape {tuple(prob.shape)}, finite: "
                                 f"{bool(torch.isfinite(prob).all())}")
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib() - rss0
        # the first step builds caches (cuDNN autotuning, compilation); the median ignores it
        return Outcome(run.variant, None, statistics.median(times[1:] or times), peak)
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
          f"(model.pretrained forced off); step = median time, peak = {memory}", file=out, flush=True)
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
