"""Time ``lggseg predict`` on one real case given as NIfTI, with and without TTA (issue #22).

The model has the laptop recipe's architecture (params.laptop.yaml: DeepLabv3+ resnet18, decoder 128,
128 px, no attributes) with random weights: the time does not depend on the weights. The case's TIFF
slices are stacked into ``<case>_{t1,flair,t1c}.nii.gz`` (LPS, 1 x 1 x 3 mm). ``--model DIR`` times a
trained model instead (e.g. ``make laptop``'s). Each setting runs ``--repeats`` times, as ``lggseg predict``
would from the shell (model load, reading, inference, writing; not the import); ``--json`` keeps every
time, the median and the machine (with its load average before and after).

    python experiments/predict_time.py /path/to/kaggle_3m/<case> --threads 2 [--model DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from lggseg.config import ModelConfig
from lggseg.models import build_model, save_model
from lggseg.predict import main as predict
from lggseg.runtime import machine_record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, help="a trained model folder (default: random weights, laptop architecture)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the times here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = args.case
    n = len(list(case.glob("*_mask.tif")))
    slices = np.stack([np.asarray(Image.open(case / f"{case.name}_{k}.tif")) for k in range(1, n + 1)])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # rows A->P, columns R->L, slice 1 inferior = an LPS array transposed in-plane
        lps = slices.transpose(2, 1, 0, 3)
        affine = np.diag([-1.0, -1.0, 3.0, 1.0])
        for c, tag in enumerate(("t1", "flair", "t1c")):
            nib.Nifti1Image(np.ascontiguousarray(lps[..., c]), affine).to_filename(str(tmp / f"{case.name}_{tag}.nii.gz"))
        model = args.model
        if model is None:
            cfg = ModelConfig(arch="deeplabv3plus", encoder="resnet18", attributes=False, decoder_channels=128,
                              pretrained=False)
            model = save_model(build_model(cfg, 0, 128), tmp / "model",
                               {"attribute_names": [], "n_attributes": 0, "image_size": 128})
        print(f"{case.name}: {n} slices of 256 x 256, torch threads {torch.get_num_threads()}")
        record = {"case": case.name, "slices": n, "model": str(args.model or "random weights, laptop architecture"),
                  "threads": torch.get_num_threads(), "machine": machine_record(), "runs": {}}
        for tta in (False, True):
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                rc = predict(["--model", str(model), "--input", str(tmp / f"{case.name}_flair.nii.gz"),
                              "--output", str(tmp / f"out{int(tta)}_{r}"), "--device", "cpu",
                              "--postprocess-min-area", "49", "--largest-3d", *(["--tta"] if tta else [])])
                times.append(time.perf_counter() - t0)
                if rc != 0:
                    return rc
                print(f"tta={tta}: {times[-1]:.1f} s per patient ({n / times[-1]:.2f} slices/s)")
            record["runs"]["tta" if tta else "no_tta"] = {
                "seconds": [round(t, 2) for t in times], "median_seconds": round(statistics.median(times), 2),
                "slices_per_second": round(n / statistics.median(times), 2)}
        record["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
