"""Learning experiment: train variants of the demo workspace with overrides, cap steps, evaluate on test."""
import os, sys, json, time, dataclasses, shutil
from pathlib import Path
import torch
from lggseg.config.variants import load_run_config
from lggseg.config import load_section, read_params
from lggseg.data import dataset as ds
from lggseg.training.session import train_all_seeds
from lggseg.evaluation.evaluate import evaluate_model
WS = Path(os.environ.get("WS", "/tmp/base/demo"))
cap = int(os.environ.get("CAP", "0"))
if cap:
    orig = ds.EmptySliceSubsampler.__init__
    def init(self, *a, **k):
        orig(self, *a, **k); self.total = min(self.total, cap)
    ds.EmptySliceSubsampler.__init__ = init
over = json.loads(os.environ.get("OVER", "{}"))
params = read_params(WS / "params.yaml")
ecfg, post = load_section("evaluate", params), load_section("postprocess", params)
for v in sys.argv[1].split(","):
    run = load_run_config(WS / f"configs/{v}.yaml")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, **over.get("train", {})))
    out = Path(f"/tmp/exp_models/{v}"); shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = train_all_seeds(run, WS / "data/manifest", out, resume=False)
    tt = time.perf_counter() - t
    r = evaluate_model(out, WS / "data/manifest", ecfg, post, "cpu")
    m = r.metrics if hasattr(r, "metrics") else r[0] if isinstance(r, tuple) else r
    if not isinstance(m, dict): m = getattr(r, "__dict__", {})
    keys = {k: m.get(k) for k in ("dice_slice_mean", "dice_tumour_slices", "dice_patient_3d", "empty_fp_rate")}
    print(f"RESULT cap={cap} over={over} {v}: val {s['best_val_dice_mean']:.3f} test {keys} train_s {tt:.1f}", flush=True)
