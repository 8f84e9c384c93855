"""``lggseg reproduce``: a raw ``kaggle_3m`` folder to test metrics of several variants in one command,
into one small folder (issue #11, part 6); ``lggseg report DIR`` builds the tables from that folder.

For a GPU lent for minutes, or anyone without DVC: the pipeline's steps with the pipeline's own
functions, not a second pipeline. ``params.yaml`` with an ``--overrides`` YAML merged over it and the
command-line settings (``--epochs``, ``--image-size``, ``--max-minutes``, ``--device``) is validated
whole (every variant asked for, through the config dataclasses) before any work; so are, in seconds,
every variant's network (built on the meta device) and its starting weights (:func:`check_models`: a
``model.pretrained`` variant on an offline machine without cached weights stops here); then

0. with ``--synthetic N`` instead of ``--raw``, the dress rehearsal: N synthetic cases in the Kaggle
   layout (:func:`lggseg.data.synthetic.generate_demo`) written into the work folder first;
1. the manifest store, built by :func:`lggseg.data.manifest.build_manifest` (the ``manifest`` stage's
   function) in a work folder outside ``DIR`` (``--work``; a temporary folder by default);
2. every seed of every variant trained at once by :func:`lggseg.training.concurrent.train_variants`, the
   variants' steps in turns, sharing the store and the device-resident data (``train.max_minutes``
   is one budget for all, see there);
3. as soon as all seeds of a variant have finished, its test evaluation by
   :func:`lggseg.evaluation.evaluate.evaluate_model` (the ``evaluate`` stage's function), and ``DIR`` is
   rewritten with that variant's results added.

Every output is written as soon as it exists: ``training.csv`` after every epoch of every run, a
variant's metrics, per-slice and per-patient rows and figure arrays as its evaluation ends, ``environment.json`` after
each phase; each file atomically, so a kill at any moment leaves every finished piece readable.

``DIR`` is the folder of :mod:`lggseg.reporting.folder` (the one owner of its format, written through
its :class:`~lggseg.reporting.folder.FolderWriter`): ``params.yaml`` (the merged parameters, ``variants``
reduced to those asked for), ``metrics.json``, ``slices.csv``, ``patients.csv``, ``figure_slices.npz``, ``training.csv``,
``components.csv`` and ``environment.json``: device and GPU name, torch/CUDA/cuDNN and library versions,
git commit, the command, image size, the data (raw folder, source, fingerprint, the manifest summary
that the stage writes to ``metrics/data.json``), wall times, and per variant and seed the epochs done
and why training stopped, wall time and images/s; the images/s of all variants together.

``lggseg report DIR`` (:mod:`lggseg.reporting.merge`) then writes ``DIR/tables.md`` (with the paired
per-patient comparisons of ``patients.csv``) and the figures in ``DIR/plots/`` through
:func:`lggseg.reporting.report.write_report`, the function the report stage ends in; Figures 7 and 8 are
drawn when the variants they compare are in the folder. ``lggseg report DIR1 DIR2 ... --tables T`` merges
the folders of several runs (each variant in one, one recipe).

A deadline for the whole command (``--deadline-minutes M``, :func:`plan_deadline`)
    The training budget (``train.max_minutes`` of every run, whose epoch plan is re-made after each
    epoch, :mod:`lggseg.training.budget`) is what is left of ``M`` once the phases around training are
    paid for: the time already spent (start-up, synthetic data, the manifest: measured), the build of
    every run (each variant's network built once on the device and timed), every variant's evaluation
    (the first variant's, untrained, evaluated on the test split and timed, times its seeds) and the
    saves at the end (as long again as the builds), less a margin of ``max(10 s, 10 % of M)`` for
    what is not measured (an epoch that runs past its estimate, the shared data's first copy to the
    device). The deadline counts from the start of :func:`main` (the interpreter's start-up before it,
    a second or two, is in the margin); a ``train.max_minutes`` or ``--max-minutes`` below the planned
    budget is kept. A deadline that leaves no time to train is one line and exit status 2 before
    training starts. ``environment.json`` keeps the plan and, at the end, the actual seconds of each
    phase (``deadline``: ``planned``, ``actual``, ``met``).

Bad input (a missing raw folder, an unknown variant, a bad override) is one line on stderr and exit
status 2, before any work. A variant whose training fails does not stop the others; it is recorded
in ``environment.json`` and the exit status is 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lggseg.config import ConfigError, RunConfig, deep_merge, load_section, read_params, validate_all
from lggseg.errors import DataError, LggsegError, ModelError
from lggseg.reporting.folder import FolderWriter

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parameters


def effective_params(params: Mapping[str, Any], variants: Sequence[str], overrides: Mapping[str, Any] | None = None,
                     *, epochs: int | None = None, image_size: int | None = None, max_minutes: float | None = None,
                     device: str | None = None) -> tuple[dict[str, Any], dict[str, RunConfig]]:
    """``params`` with ``overrides`` and the command-line settings merged over it, ``variants`` reduced
    to ``variants`` (in that order); validated whole. Returns the merged params and the resolved runs."""
    if not variants:
        raise ConfigError("--variants: name at least one variant")
    merged = deep_merge(params, overrides or {})
    known = merged.get("variants") or {}
    if not isinstance(known, Mapping):
        raise ConfigError("params: 'variants' must be a mapping of variant name -> overrides")
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if len(set(variants)) < len(variants):
        raise ConfigError(f"--variants names a variant twice: {', '.join(variants)}")
    cli: dict[str, Any] = {}
    if epochs is not None:
        cli.setdefault("train", {})["epochs"] = epochs
    if max_minutes is not None:
        cli.setdefault("train", {})["max_minutes"] = max_minutes
    if image_size is not None:
        cli.setdefault("common", {})["image_size"] = image_size
    if device is not None:
        cli.setdefault("common", {})["device"] = device
    merged = deep_merge(merged, cli)
    merged["variants"] = {v: known[v] for v in variants}
    # a variant's own train section wins over the global one; the command line must win over both
    for v in variants:
        own = merged["variants"][v] or {}
        if isinstance(own, Mapping) and isinstance(own.get("train"), Mapping) and "train" in cli:
            merged["variants"][v] = deep_merge(own, {"train": cli["train"]})
    runs = validate_all(merged)
    return merged, runs


def read_overrides(path: str | Path | None) -> dict[str, Any]:
    """The ``--overrides`` YAML (a mapping of params sections), or nothing."""
    return {} if path is None else read_params(path)


# --------------------------------------------------------------------------- the output folder


def data_source(raw: Path, store_meta: Mapping[str, Any]) -> str:
    """kaggle | demo | local: the fetch stage's record if it wrote one, else the demo's README, else local."""
    if store_meta.get("source"):
        return str(store_meta["source"])
    try:
        readme = (raw / "README.txt").read_text(errors="replace")
    except OSError:
        readme = ""
    return "demo" if readme.startswith("SYNTHETIC DEMO DATA") else "local"


def _variant_record(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = ("epochs", "epochs_planned", "epochs_done", "stop_reason", "max_minutes", "best_epoch", "best_val_dice",
            "wall_seconds", "train_seconds", "seconds_per_epoch", "images_per_second", "data_path")
    return {str(r["seed"]): {k: r.get(k) for k in keys} for r in results}


def _device_record(device: Any) -> dict[str, Any]:
    import torch

    from lggseg.runtime import cpu_name, software_versions

    record: dict[str, Any] = {"type": device.type, "cpu": cpu_name(), "software": software_versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    else:
        record["name"] = record["cpu"]
    return record


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the run


_PROBE_ATTRIBUTES = 16  # the attribute width is known after the manifest; the networks build alike at any width


def check_models(runs: Mapping[str, RunConfig]) -> None:
    """Before any work (the manifest takes minutes): every variant's network builds and its starting
    weights can be had, else one :class:`~lggseg.errors.ModelError` naming the variant.

    The build is on the meta device (no memory, no weights; seconds for all variants); the weights are
    checked by :func:`lggseg.models.encoders.check_pretrained_weights` (local file, cache, or a download
    now). Variants with the same ``model`` section and image size are checked once.
    """
    import dataclasses

    import torch

    from lggseg.models import build_model
    from lggseg.models.encoders import check_pretrained_weights

    seen: set[str] = set()
    for variant, run in runs.items():
        key = repr((run.model, run.common.image_size))
        if key in seen:
            continue
        seen.add(key)
        try:
            check_pretrained_weights(run.model, run.common.image_size)
            with torch.device("meta"):
                build_model(dataclasses.replace(run.model, pretrained=False, weights_file=None), _PROBE_ATTRIBUTES,
                            run.common.image_size)
        except LggsegError as exc:
            raise type(exc)(f"variant {variant}: {' '.join(str(exc).split())}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to build is this variant's, said in one line
            raise ModelError(f"variant {variant}: its network does not build: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:240]}") from None


MARGIN_FRACTION, MARGIN_MIN_S = 0.10, 10.0  # the deadline's margin: max(10 s, 10 % of the deadline)


def deadline_margin(deadline_s: float) -> float:
    """Seconds of the deadline kept free for what the plan does not measure: ``max(10 s, 10 %)``."""
    return max(MARGIN_MIN_S, MARGIN_FRACTION * deadline_s)


def plan_deadline(deadline_s: float, spent_s: float, build_s: Mapping[str, float], n_seeds: Mapping[str, int],
                  evaluation_s: float) -> dict[str, Any]:
    """The training budget that ends the command inside ``deadline_s``, and the estimate behind it.

    ``spent_s``: seconds already gone; ``build_s``: seconds to build each variant's network (per run;
    the saves at the end are counted as long again); ``n_seeds``: runs per variant; ``evaluation_s``:
    one seed's evaluation. ``training_s`` may be <= 0: nothing is left to train in.
    """
    builds = sum(build_s[v] * n for v, n in n_seeds.items())
    evaluation = {v: evaluation_s * n for v, n in n_seeds.items()}
    margin = deadline_margin(deadline_s)
    training = deadline_s - spent_s - 2 * builds - sum(evaluation.values()) - margin
    return {"deadline_s": round(deadline_s, 2), "margin_s": round(margin, 2), "spent_s": round(spent_s, 2),
            "build_s": round(builds, 2), "save_s": round(builds, 2),
            "evaluation_s": {v: round(t, 2) for v, t in evaluation.items()}, "training_s": round(training, 2)}


def measure_phases(runs: Mapping[str, RunConfig], store: Any, evaluate_cfg: Any, post: Any,
                   device: Any) -> tuple[dict[str, float], float]:
    """``({variant: seconds to build its network on the device}, seconds of one seed's test evaluation)``:
    every variant built once (random initialisation unless ``model.pretrained``), the first one, untrained,
    evaluated on the store's test split exactly as a trained one is (same slices, post-processing and
    bootstrap), which also warms the device up."""
    import dataclasses

    import torch

    from lggseg.evaluation.evaluate import evaluate_loaded
    from lggseg.models import build_model

    n_attributes = int(store.attributes.shape[1])
    build_s: dict[str, float] = {}
    first = None
    for v, run in runs.items():
        t = time.perf_counter()
        torch.manual_seed(0)
        model = build_model(run.model, n_attributes, run.common.image_size).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        build_s[v] = time.perf_counter() - t
        if first is None:
            first = (run, model)
        del model
    run, model = first
    meta = {"image_size": run.common.image_size, "attribute_names": list(store.attribute_names),
            "n_attributes": n_attributes, "model_config": dataclasses.asdict(run.model), "model_dir": "deadline probe"}
    t = time.perf_counter()
    evaluate_loaded({run.seeds[0]: (model.eval(), meta)}, store, evaluate_cfg, post, device)
    return build_s, time.perf_counter() - t


def reproduce(raw: str | Path | None, out: str | Path, params: Mapping[str, Any], runs: Mapping[str, RunConfig],
              work: str | Path | None = None, command: str | None = None, *, deadline_minutes: float | None = None,
              started: float | None = None, synthetic: int | None = None) -> dict[str, Any]:
    """Manifest, training of ``runs`` at once, evaluation, the folder ``out``; returns ``environment.json``.

    ``params`` and ``runs`` come from :func:`effective_params`. ``work`` holds the store and the models
    (kept, so a rerun resumes the training); None: a temporary folder, removed at the end.
    ``deadline_minutes``: the whole command's deadline, counted from ``started`` (a
    ``time.perf_counter()``; default now), see the module's docstring. ``synthetic``: instead of ``raw``,
    that many synthetic cases (:func:`lggseg.data.synthetic.generate_demo`) written into ``work``.
    """
    started = time.perf_counter() if started is None else started
    if (raw is None) == (synthetic is None):
        raise ConfigError("reproduce: give either --raw or --synthetic N")
    if synthetic is not None and (isinstance(synthetic, bool) or not isinstance(synthetic, int) or synthetic < 1):
        raise ConfigError(f"--synthetic must be a positive number of cases, got {synthetic!r}")
    out = Path(out)
    if raw is not None and not Path(raw).is_dir():
        raise DataError(f"--raw {raw}: no such folder (expected a kaggle_3m folder: case folders and data.csv)")
    check_models(runs)  # seconds; a variant that cannot build fails before the manifest
    temp = work is None
    work = Path(tempfile.mkdtemp(prefix="lggseg-reproduce-")) if temp else Path(work)
    if out.resolve() == work.resolve() or out.resolve() in work.resolve().parents:
        raise ConfigError(f"--work {work} must lie outside --out {out}: the output folder keeps to its 8 files")
    try:
        if synthetic is not None:
            from lggseg.data.synthetic import generate_demo

            raw = generate_demo(work / "synthetic", synthetic)
        raw = Path(raw)
        return _reproduce(raw, out, params, runs, work, command, deadline_minutes, started)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def _reproduce(raw: Path, out: Path, params: Mapping[str, Any], runs: Mapping[str, RunConfig], work: Path,
               command: str | None, deadline_minutes: float | None, started: float) -> dict[str, Any]:
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store
    from lggseg.evaluation.evaluate import evaluate_model
    from lggseg.runtime import git_commit, resolve_device
    from lggseg.training import train_variants

    t_start = time.perf_counter()
    common, manifest_cfg = load_section("common", params), load_section("manifest", params)
    evaluate_cfg, post = load_section("evaluate", params), load_section("postprocess", params)
    device = resolve_device(common.device)
    names = list(runs)
    env: dict[str, Any] = {
        "command": command, "started": _now(), "finished": None, "git_commit": git_commit(),
        "device": _device_record(device), "image_size": common.image_size,
        "epochs": {v: r.train.epochs for v, r in runs.items()},
        "max_minutes": {v: r.train.max_minutes for v, r in runs.items()},
        "variants": {v: {"status": "pending"} for v in names},
    }
    folder = FolderWriter(out, params, env)

    store_dir = work / "manifest"
    t0 = time.perf_counter()
    summary = build_manifest(raw, store_dir, common, manifest_cfg, small_side=evaluate_cfg.noise_side)
    store = load_store(store_dir)
    env["data"] = {"raw": str(raw), "source": data_source(raw, store.meta), "fingerprint": store.meta.get("fingerprint"),
                   "summary": summary}
    env["seconds"] = {"manifest": round(time.perf_counter() - t0, 2)}
    folder.add_components(store_dir)
    folder.write_environment()
    if deadline_minutes is not None:
        try:
            runs = _apply_deadline(runs, store, evaluate_cfg, post, device, deadline_minutes, started, env)
        finally:  # the plan is recorded also when it leaves no time to train
            folder.write_environment()

    jobs = [(v, s) for v in names for s in runs[v].seeds]
    pending = {v: len(runs[v].seeds) for v in names}
    trained: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    evaluation_s = 0.0
    t_train = time.perf_counter()

    def on_result(k: int, result: dict[str, Any]) -> None:
        nonlocal evaluation_s
        v = jobs[k][0]
        trained[v].append(result)
        pending[v] -= 1
        if pending[v] or env["variants"][v]["status"] == "failed":
            return
        t = time.perf_counter()
        try:
            evaluation = evaluate_model(work / "models" / v, store, evaluate_cfg, post, device)
        except Exception as exc:  # noqa: BLE001 - recorded for this variant; the others go on training
            on_error(jobs.index((v, runs[v].seeds[0])), exc)
            return
        finally:
            evaluation_s += time.perf_counter() - t
        results = sorted(trained[v], key=lambda r: r["seed"])
        env["variants"][v] = {"status": "done", "evaluation_seconds": round(time.perf_counter() - t, 2),
                              "dice_slice_mean": evaluation.metrics["dice_slice_mean"], "seeds": _variant_record(results)}
        folder.add_variant(v, evaluation.metrics, evaluation.slices, evaluation.figures, results, evaluation.patients)
        log.info("%s: test Dice slice mean %.4f -> %s", v, evaluation.metrics["dice_slice_mean"], out)

    def on_epoch(k: int, row: dict[str, float]) -> None:
        v, seed = jobs[k]
        folder.add_epoch(v, seed, row)

    def on_error(k: int, exc: BaseException) -> None:
        v, seed = jobs[k]
        env["variants"][v] = {"status": "failed", "error": f"seed {seed}: {' '.join(str(exc).split())}"}
        folder.write_environment()

    t0 = time.perf_counter()
    train_variants([runs[v] for v, _ in jobs], store_dir, [work / "models" / v / f"seed_{s}" for v, s in jobs],
                   [s for _, s in jobs], on_result=on_result, on_error=on_error, on_epoch=on_epoch)
    wall = time.perf_counter() - t0
    # a run's images: its img/s times its training seconds (result.json keeps the rate, not the count)
    images = sum((r.get("images_per_second") or 0) * (r.get("train_seconds") or 0) for rs in trained.values() for r in rs)
    env["seconds"].update(training_and_evaluation=round(wall, 2), evaluation=round(evaluation_s, 2),
                          total=round(time.perf_counter() - t_start, 2))
    # all variants' training images over the training wall time (their evaluations, which ran in
    # between, taken out): the device's throughput with the variants in turns
    train_wall = wall - evaluation_s
    env["images_per_second_all_variants"] = round(images / train_wall, 2) if train_wall > 0 and images else None
    env["seconds"]["training"] = round(train_wall, 2)
    if deadline_minutes is not None:
        done = {v: r.get("evaluation_seconds") for v, r in env["variants"].items()}
        total = time.perf_counter() - started
        env["deadline"]["actual"] = {
            "spent_s": env["deadline"]["planned"]["spent_s"], "probe_s": env["deadline"]["probe_s"],
            "builds_training_and_saves_s": round(train_wall, 2), "evaluation_s": done,
            "since_training_started_s": round(time.perf_counter() - t_train, 2), "total_s": round(total, 2)}
        env["deadline"]["met"] = total <= deadline_minutes * 60
        if not env["deadline"]["met"]:
            log.warning("the command took %.0f s, past its deadline of %g minutes", total, deadline_minutes)
    env["finished"] = _now()
    folder.write_environment()
    return env


def _apply_deadline(runs: Mapping[str, RunConfig], store: Any, evaluate_cfg: Any, post: Any, device: Any,
                    deadline_minutes: float, started: float, env: dict[str, Any]) -> dict[str, RunConfig]:
    """``runs`` with ``train.max_minutes`` set from the measured phases (:func:`plan_deadline`); the plan
    goes to ``env["deadline"]``. Raises :class:`ConfigError` when no epoch fits."""
    import dataclasses

    t = time.perf_counter()
    build_s, evaluation_s = measure_phases(runs, store, evaluate_cfg, post, device)
    probe = time.perf_counter() - t
    plan = plan_deadline(deadline_minutes * 60, time.perf_counter() - started, build_s,
                         {v: len(r.seeds) for v, r in runs.items()}, evaluation_s)
    env["deadline"] = {"minutes": deadline_minutes, "rule": "training = deadline - spent - builds - saves (= builds) "
                       "- evaluations - margin, margin = max(10 s, 10 % of the deadline)",
                       "probe_s": round(probe, 2), "evaluation_one_seed_s": round(evaluation_s, 2),
                       "build_per_variant_s": {v: round(b, 2) for v, b in build_s.items()}, "planned": plan}
    if plan["training_s"] <= 0:
        raise ConfigError(
            f"--deadline-minutes {deadline_minutes:g} is too short: {plan['spent_s']:.0f} s spent, builds and saves "
            f"{2 * plan['build_s']:.0f} s, evaluations {sum(plan['evaluation_s'].values()):.0f} s and a margin of "
            f"{plan['margin_s']:.0f} s leave no time to train")
    minutes = plan["training_s"] / 60
    out = {}
    for v, run in runs.items():
        mine = minutes if run.train.max_minutes is None else min(minutes, run.train.max_minutes)
        out[v] = dataclasses.replace(run, train=dataclasses.replace(run.train, max_minutes=round(mine, 4)))
    env["max_minutes"] = {v: r.train.max_minutes for v, r in out.items()}
    log.info("deadline %g min: %.0f s spent, %.0f s to train (margin %.0f s)", deadline_minutes, plan["spent_s"],
             plan["training_s"], plan["margin_s"])
    return out


# --------------------------------------------------------------------------- command line


def build_parser(prog: str = "lggseg reproduce") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--raw", type=Path, help="a kaggle_3m folder (case folders and data.csv)")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="the dress rehearsal: N synthetic cases in the Kaggle layout, made in the work folder")
    ap.add_argument("--variants", required=True, help="comma-separated variant names of the params file")
    ap.add_argument("--out", required=True, type=Path, help="output folder (at most 8 files)")
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--overrides", type=Path, help="YAML of params sections merged over the params file")
    ap.add_argument("--epochs", type=int, help="train.epochs of every variant")
    ap.add_argument("--image-size", type=int, help="common.image_size")
    ap.add_argument("--max-minutes", type=float, help="train.max_minutes: one training budget for all variants")
    ap.add_argument("--device", help="common.device: auto | cpu | cuda")
    ap.add_argument("--deadline-minutes", type=float,
                    help="the whole command's deadline: train.max_minutes is planned from the measured phases")
    ap.add_argument("--work", type=Path, help="folder for the store and the models, kept (default: a temporary one)")
    return ap


def main(argv: list[str] | None = None, prog: str = "lggseg reproduce") -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("lggseg").setLevel(logging.INFO)
    try:
        if args.deadline_minutes is not None and not args.deadline_minutes > 0:
            raise ConfigError(f"--deadline-minutes must be a positive number of minutes, got {args.deadline_minutes:g}")
        if args.raw is not None and not args.raw.is_dir():
            raise DataError(f"--raw {args.raw}: no such folder (expected a kaggle_3m folder: case folders and data.csv)")
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        params, runs = effective_params(read_params(args.params), variants, read_overrides(args.overrides),
                                        epochs=args.epochs, image_size=args.image_size, max_minutes=args.max_minutes,
                                        device=args.device)
        env = reproduce(args.raw, args.out, params, runs, args.work, command=shlex.join([prog, *argv]),
                        deadline_minutes=args.deadline_minutes, started=started, synthetic=args.synthetic)
    except LggsegError as exc:
        print(f"reproduce: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    failed = {v: r["error"] for v, r in env["variants"].items() if r["status"] != "done"}
    for v, r in env["variants"].items():
        if r["status"] == "done":
            epochs = ", ".join(f"{s['epochs_done']}/{s['epochs']} epochs" for s in r["seeds"].values())
            print(f"{v}: test Dice slice mean {r['dice_slice_mean']:.4f} ({epochs})")
    if env.get("deadline"):
        d = env["deadline"]
        print(f"deadline {d['minutes']:g} min: took {d['actual']['total_s']:.0f} s (training budget "
              f"{d['planned']['training_s']:.0f} s, margin {d['planned']['margin_s']:.0f} s)"
              + ("" if d["met"] else ": MISSED"))
    print(f"{args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    for v, error in failed.items():
        print(f"reproduce: {v} failed: {error}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
