"""``lggseg.models.registry.build_model``: the weights a seed gives are pinned.

The fingerprints below were computed with the code before issue #12 moved the networks onto smp's
constructors (``AttributeDeepLabV3Plus`` then assembled smp's decoder by hand): same seed, same
config -> same state-dict layout, same initial tensors and the same RNG position after the build.
A change here re-initialises every network, so trained runs would no longer reproduce.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lggseg.config import ModelConfig
from lggseg.models import build_model

N_ATTR, SIZE, SEED = 9, 64, 0

CONFIGS = {
    "paper": ModelConfig(pretrained=False),
    "unet": ModelConfig(pretrained=False, arch="unet", encoder="resnet10t", attributes=False),
    "swin": ModelConfig(pretrained=False, encoder="swinv2_base_window8_256", decoder_channels=64),
}

# name -> n_parameters, n_tensors, sha256[:16] of the "key shape dtype" lines, torch.rand(1) after the build,
# {tensor: (float64 sum, first two values)}
FINGERPRINTS = {
    "paper": {
        "n_parameters": 27772122,
        "n_tensors": 687,
        "layout_sha256": "614a19271d83c134",
        "rng_after": 0.40947777032852173,
        "tensors": {
            "encoder.model.stem.conv.weight": (-3.0734442678531195, [-0.05538750812411308, 0.10928143560886383]),
            "decoder.aspp.0.convs.0.0.weight": (-20.430320656897408, [0.008831930346786976, -0.026879863813519478]),
            "decoder.aspp.0.project.0.weight": (13.905475688141273, [0.024792829528450966, -0.010277893394231796]),
            "decoder.block1.0.weight": (2.5062269267145894, [-0.04697706177830696, -0.04976769536733627]),
            "decoder.block2.0.1.weight": (-0.024955380542905914, [-0.011845190078020096, 0.02694714069366455]),
            "segmentation_head.0.weight": (0.6720006093382835, [-0.03768320381641388, 0.006780199706554413]),
            "attribute_encoder.mlp.0.weight": (4.746709971695964, [0.037875138223171234, 0.23635777831077576]),
            "attribute_encoder.mlp.2.bias": (0.1704475256265141, [0.0003171234275214374, 0.07260338217020035]),
        },
    },
    "unet": {
        "n_parameters": 8074185,
        "n_tensors": 146,
        "layout_sha256": "3a05ccef2cdf1af4",
        "rng_after": 0.6956636905670166,
        "tensors": {
            "encoder.model.conv1.0.weight": (-1.7134369439154398, [0.16390830278396606, 0.0937729999423027]),
            "decoder.blocks.0.conv1.0.weight": (3.120207920293872, [0.00907132588326931, 0.0214984230697155]),
            "segmentation_head.0.weight": (1.0370549939398188, [-0.17372752726078033, 0.11760206520557404]),
        },
    },
    "swin": {
        "n_parameters": 87473930,
        "n_tensors": 486,
        "layout_sha256": "8c74be91e7ca9946",
        "rng_after": 0.5870581865310669,
        "tensors": {
            "encoder.model.layers_3.blocks.0.attn.qkv.weight": (11.673506070548548, [0.001967811491340399, 0.003797505982220173]),
            "decoder.aspp.0.convs.0.0.weight": (1.532898628073518, [0.017441831529140472, 0.0034420837182551622]),
            "attribute_encoder.mlp.2.weight": (1.0470875840273948, [0.019042441621422768, -0.017233803868293762]),
        },
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "name", ["paper", "unet", pytest.param("swin", marks=pytest.mark.slow)]
)
def test_a_seed_gives_the_pinned_weights(name: str) -> None:
    torch.manual_seed(SEED)
    model = build_model(CONFIGS[name], N_ATTR, SIZE)
    rng_after = torch.rand(1).item()
    state = model.state_dict()
    want = FINGERPRINTS[name]
    layout = "\n".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in state.items())
    assert sum(p.numel() for p in model.parameters()) == want["n_parameters"]
    assert len(state) == want["n_tensors"]
    assert hashlib.sha256(layout.encode()).hexdigest()[:16] == want["layout_sha256"]
    assert rng_after == pytest.approx(want["rng_after"], rel=1e-7)  # the build drew exactly as many numbers
    for key, (total, first) in want["tensors"].items():
        assert float(state[key].double().sum()) == pytest.approx(total, rel=1e-6, abs=1e-6), key
        assert state[key].flatten()[:2].tolist() == pytest.approx(first, rel=1e-6), key
