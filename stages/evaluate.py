"""Stage evaluate@<variant>: score a variant's models on the test split (paper section 4.1.2).

Writes ``metrics/<variant>.json`` and ``data/eval/<variant>/{slices.csv, patients.csv, figure_slices.npz}``,
and each model's ``MODEL_CARD.md`` again with the test metrics.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lggseg.config import load_section, read_params
from lggseg.errors import LggsegError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--models", required=True, help="models/<variant> with seed_<s>/ sub-directories")
    ap.add_argument("--data", required=True, help="manifest store directory")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--rows", required=True, help="directory for slices.csv, patients.csv, figure_slices.npz")
    args = ap.parse_args(argv)
    # imported after parsing: --help and usage errors stay fast
    from lggseg.evaluation.evaluate import evaluate_model, write_evaluation, write_model_cards

    # lggseg's notes (the device chosen, why a GPU is not used) on stderr; other libraries stay quiet
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("lggseg").setLevel(logging.INFO)
    try:
        params = read_params(args.params)
        cfg, post = load_section("evaluate", params), load_section("postprocess", params)
        device = load_section("common", params).device
        result = evaluate_model(args.models, args.data, cfg, post, device, split=cfg.split)
        write_evaluation(result, args.metrics, args.rows)
        write_model_cards(args.models, result.metrics)
    except LggsegError as exc:
        print(f"evaluate@{args.variant}: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"evaluate@{args.variant}: Dice slice mean {m['dice_slice_mean']}, patient 3D {m['dice_patient_3d']} "
          f"({m['n_test_slices']} {cfg.split} slices, {m['n_test_patients']} patients, seeds {m['seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
