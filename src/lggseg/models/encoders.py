"""Image encoders for the networks: timm backbones as smp encoders, built by smp's own model constructors.

smp's ``DeepLabV3Plus`` and ``Unet`` constructors make their encoder with smp's ``get_encoder(name,
depth=, output_stride=)``, which looks ``name`` up in smp's encoder registry
(``segmentation_models_pytorch.encoders.encoders``). :func:`deeplab_encoder` and :func:`unet_encoder`
check a ``model`` config, register the encoder it describes there under a name derived from all its
settings (:func:`_register`), and return that name for the network's ``encoder_name``:

* :class:`TimmEncoder`: smp's ``TimmUniversalEncoder`` that gets its ImageNet weights itself (timm's hub,
  or a local ``model.weights_file`` checked by :func:`check_weights_file`; failing to get them is a
  :class:`~lggseg.errors.ModelError`, never a silent random init) and can join a map to its deep
  feature (the attribute map of section 3.2.3), counted in ``out_channels`` so that smp sizes ASPP for it.
* :class:`FusedStride16Encoder` lets encoders that timm cannot dilate (Swin Transformer v2 of
  Table 4) feed DeepLabv3+: their deep feature is stage 3 (H/16) concatenated with the upsampled
  stage 4 (H/32).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import TimmUniversalEncoder
from segmentation_models_pytorch.encoders import encoders as smp_registry
from torch import nn

from lggseg.config import ModelConfig
from lggseg.errors import ModelError

TABLE4_ENCODERS = (
    "resnet101",
    "tf_efficientnet_b5",
    "xception65",
    "repvgg_b2",
    "tf_efficientnetv2_m",
    "swinv2_base_window8_256",
    "regnetz_040",
)
"""The DeepLabv3+ encoders compared in the paper's Table 4 (timm names)."""


ENCODER_DEPTH = 5  # smp feature list [x, /2, /4, /8, /16, /32]; DeepLabv3+ reads index 2 (/4) and the last

JoinFn = Callable[[torch.Size], torch.Tensor]
"""``(h, w) of the deep feature -> (B, joined_channels, h, w)`` map to concatenate to it."""


class TimmEncoder(TimmUniversalEncoder):
    """smp's timm encoder as lggseg's networks get it from smp's registry.

    Built like ``TimmUniversalEncoder(name, pretrained, depth=, output_stride=, **timm_kwargs)``
    (timm dilates the last stages for ``output_stride`` 8/16), with ``weights_file`` as timm's local
    source of the pretrained weights; any failure is a :class:`ModelError` that says what to do.

    With ``joined_channels > 0`` the deep feature the decoder receives is the image feature with a
    ``joined_channels`` map concatenated (the attribute map): ``out_channels[-1]`` counts them,
    and ``forward(x, join)`` calls ``join((h, w))`` for that map. :meth:`image_features` gives the
    features of the image alone.
    """

    def __init__(
        self,
        name: str,
        *,
        depth: int = ENCODER_DEPTH,
        output_stride: int = 32,
        pretrained: bool = False,
        weights_file: str | None = None,
        joined_channels: int = 0,
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        kwargs = dict(timm_kwargs or {})
        if weights_file:
            # 'file' outranks the hub in timm's source resolution; timm reads it with weights_only=True
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
        try:
            super().__init__(name, pretrained=pretrained, depth=depth, output_stride=output_stride, **kwargs)
        except Exception as exc:
            raise ModelError(_build_failure(exc, name, pretrained, weights_file)) from exc
        self.joined_channels = int(joined_channels)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each feature ``forward`` returns (the deep one with the joined map)."""
        *head, deep = self._out_channels
        return [*head, deep + self.joined_channels]

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """smp's hook for other input widths; the networks read RGB images only."""
        if in_channels != self._in_channels:
            raise ModelError(
                f"encoder {self.name}: built for {self._in_channels} input channels, not {in_channels}"
            )

    def make_dilated(self, output_stride: int) -> None:
        """smp's hook to dilate after construction. timm already built the encoder dilated, so this
        checks that the features are where DeepLabv3+ reads them: H/4 third, H/``output_stride`` last."""
        strides = feature_strides(self)
        built = output_stride == self.output_stride and len(strides) > 2 and strides[2] == 4
        if not built or strides[-1] != output_stride:
            raise ModelError(
                f"encoder {self.name!r} gives features at strides {strides[1:]}; DeepLabv3+ needs H/4 (third) and "
                f"H/{output_stride} (last)"
            )

    def image_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """smp's features of the image alone.

        Args:
            x: images ``(B, 3, H, W)``.

        Returns:
            ``[x, H/2, H/4, H/8, H/16, H/32 or the dilated deep feature]`` as ``(B, C_i, H_i, W_i)``
            (Swin-like encoders: an empty ``(B, 0, H/2, W/2)`` at H/2); the deep one without the joined map.
        """
        return super().forward(x)

    def forward(self, x: torch.Tensor, join: JoinFn | None = None) -> list[torch.Tensor]:
        """:meth:`image_features` with ``join``'s map concatenated to the deep feature (in its dtype).

        Args:
            x: images ``(B, 3, H, W)``.
            join: needed iff ``joined_channels > 0``; called with the deep feature's ``(h, w)``, returns
                ``(B, joined_channels, h, w)``.

        Returns:
            one tensor per entry of ``out_channels``, ``(B, out_channels[i], H / stride_i, W / stride_i)``.
        """
        features = self.image_features(x)
        if not self.joined_channels:
            return features
        if join is None:
            raise ModelError(
                f"encoder {self.name} joins a {self.joined_channels}-channel map to its deep feature; "
                "call forward(x, join) or image_features(x)"
            )
        deep = features[-1]
        extra = join(deep.shape[-2:]).to(deep.dtype)
        return [*features[:-1], torch.cat([deep, extra], dim=1)]


class FusedStride16Encoder(TimmEncoder):
    """smp's timm encoder for backbones timm cannot dilate, with a stride-16 deep feature.

    DeepLabv3+ wants its deep feature at H/16, which CNNs get by dilating the last stage
    (``output_stride=16``). Windowed transformers (Swin v2) cannot be dilated and timm's Swin has
    no ``output_stride``; smp 0.6.0 passes ``output_stride`` to timm and fails for them. Dropping
    stage 4 would waste half the (pretrained) network, so the deep feature here is stage 3 (H/16)
    concatenated with stage 4 (H/32) upsampled bilinearly to H/16; ASPP's 1x1 and atrous
    convolutions learn the fusion. smp already converts Swin's NHWC features to NCHW and inserts
    an empty H/2 feature, so the low-level H/4 feature stays at index 2 as DeepLabv3+ expects.

    Swin is built for one input size (``input_size``); other sizes are rejected with a clear error.
    """

    def __init__(self, name: str, *, input_size: int, output_stride: int = 16, **kwargs: Any) -> None:
        if output_stride != 16:
            raise ModelError(f"encoder {name!r} cannot be dilated: output stride 16 only, not {output_stride}")
        super().__init__(name, output_stride=32, **kwargs)
        *head, c16, c32 = self._out_channels
        self._out_channels = [*head, c16 + c32]
        self.input_size = int(input_size)

    @property
    def output_stride(self) -> int:
        return 16

    def image_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """As :meth:`TimmEncoder.image_features`, the last one the fused ``(B, C3 + C4, H/16, W/16)``;
        ``x`` must be ``input_size`` x ``input_size``."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ModelError(
                f"encoder {self.name} was built for {self.input_size}x{self.input_size} inputs "
                f"(common.image_size), got {tuple(x.shape[-2:])}"
            )
        *features, f16, f32 = super().image_features(x)
        f32 = F.interpolate(f32, size=f16.shape[-2:], mode="bilinear", align_corners=False)
        return [*features, torch.cat([f16, f32], dim=1)]


def timm_name(encoder: str) -> str:
    """The timm model name of ``model.encoder`` (without smp's ``tu-`` prefix); an unknown one raises ``ModelError``."""
    name = encoder.removeprefix("tu-")
    if not timm.is_model(name):
        raise ModelError(f"model.encoder {encoder!r} is not a timm model (see timm.list_models())")
    return name


def _timm_kwargs(name: str, image_size: int) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments: fixed-size transformers are built for ``image_size``."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        return {"img_size": image_size}
    return {}


def _dilatable(name: str, output_stride: int, kwargs: Mapping[str, Any]) -> bool:
    """Whether timm can build ``name`` at ``output_stride`` (checked on the meta device: no memory, no weights)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, features_only=True, output_stride=output_stride, **kwargs)
    except TypeError:  # the model's __init__ has no output_stride argument (Swin, ViT, ...)
        return False
    except Exception as exc:
        raise ModelError(f"could not build encoder {name!r}: {_short(exc)}") from exc
    return True


def _reference_state(name: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Size], tuple[str, ...]]:
    """Key -> shape of a full timm model (on the meta device) and its classifier prefixes."""
    with torch.device("meta"):
        ref = timm.create_model(name, **kwargs)
    classifier = ref.pretrained_cfg.get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    return {k: v.shape for k, v in ref.state_dict().items()}, tuple(f"{c}." for c in classifier)


def summarise_keys(keys: Sequence[str], limit: int = 6) -> str:
    """The first ``limit`` of the sorted ``keys`` and how many more, for one-line error messages."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights_file(path: str | Path, encoder: str, image_size: int = 256) -> Path:
    """Validate a local timm-format state dict for ``encoder`` (``model.weights_file``).

    The file is what ``timm.create_model(encoder).state_dict()`` holds (or timm's hub
    ``model.safetensors``): safetensors, or a torch file read with ``weights_only=True``. The
    classifier may be absent. Missing, unexpected or mis-shaped tensors raise :class:`ModelError`.
    """
    path = Path(path)
    name = timm_name(encoder)
    if not path.is_file():
        raise ModelError(f"model.weights_file {path}: no such file (encoder {name})")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # safetensors, pickle-refusal and zip errors all mean "unreadable"
        raise ModelError(
            f"model.weights_file {path}: cannot read a state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.weights_file {path}: does not hold a flat name -> tensor state dict")
    expected, classifier = _reference_state(name, _timm_kwargs(name, image_size))

    def optional(key: str) -> bool:
        return key.startswith(classifier)

    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in state
        if k in expected and state[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {summarise_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {summarise_keys(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {summarise_keys(wrong, 3)}")
    if problems:
        raise ModelError(
            f"model.weights_file {path} is not a timm state dict of {name!r}: " + "; ".join(problems)
        )
    return path


def _weights_file(cfg: ModelConfig, name: str, image_size: int) -> str | None:
    """The checked ``model.weights_file`` (None: timm's hub or no weights); contradictions raise ModelError."""
    if not cfg.pretrained:
        if cfg.weights_file:
            raise ModelError(
                f"model.weights_file is set ({cfg.weights_file}) but model.pretrained is false; "
                "set pretrained: true to load it, or weights_file: null"
            )
        return None
    if cfg.weights_file:
        return str(check_weights_file(cfg.weights_file, name, image_size))
    return None


def _hub_offline() -> bool:
    """Whether huggingface_hub was told not to use the network (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_files(hf_hub_id: str, filename: str | None) -> tuple[str, str | None, tuple[str, ...]]:
    """``(repo, revision, files timm tries in order)`` for a timm ``hf_hub_id`` (as timm's ``load_state_dict_from_hf``)."""
    repo, _, revision = hf_hub_id.partition("@")
    if not filename or filename == "pytorch_model.bin":
        files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    elif filename.endswith(".bin"):  # timm looks for a safetensors twin first
        files = (filename[: -len(".bin")] + ".safetensors", filename)
    else:
        files = (filename,)
    return repo, revision or None, files


def check_pretrained_weights(cfg: ModelConfig, image_size: int = 256) -> str | None:
    """Make sure the weights ``cfg`` starts from can be had now, before any long work: ``model.weights_file``
    checked (:func:`check_weights_file`), or timm's ImageNet weights of ``model.encoder`` in the local
    cache (Hugging Face hub cache, or torch hub's for URL weights), else downloaded into it now (what the
    model build would do). Returns where the weights are (None: ``model.pretrained`` is off).

    Raises :class:`ModelError` in one line when they cannot be had: not cached and ``HF_HUB_OFFLINE``
    set (no network tried), or the download failed (an offline node fails here in seconds, instead of
    every variant failing at its build after the manifest).
    """
    if not cfg.pretrained:
        return None
    name = timm_name(cfg.encoder)
    if cfg.weights_file:
        return str(check_weights_file(cfg.weights_file, name, image_size))
    what = f"model.pretrained is true but timm's ImageNet weights of {name!r}"
    fix = ("; set model.weights_file to a local timm state dict, or model.pretrained: false "
           "(as params.gpu-lease.yaml does)")
    pcfg = timm.get_pretrained_cfg(name)
    hf_hub_id, url = (pcfg.hf_hub_id, pcfg.url) if pcfg is not None else (None, None)
    if hf_hub_id:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

        repo, revision, files = _hub_files(hf_hub_id, pcfg.hf_hub_filename)
        for file in files:
            cached = try_to_load_from_cache(repo, file, revision=revision)
            if isinstance(cached, str):
                return cached
        if _hub_offline():
            raise ModelError(f"{what} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                             f"HF_HUB_OFFLINE is set{fix}")
        try:
            return hf_hub_download(repo, files[0], revision=revision)
        except Exception as first:  # noqa: BLE001 - any failure means "no weights"; try timm's fallback file
            if len(files) == 1:
                raise ModelError(f"{what} could not be downloaded ({_short(first, 160)}){fix}") from None
            try:
                return hf_hub_download(repo, files[1], revision=revision)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"{what} could not be downloaded ({_short(exc, 160)}){fix}") from None
    if url:
        url, file = url if isinstance(url, tuple | list) else (url, Path(urlparse(url).path).name)
        cached_file = Path(torch.hub.get_dir()) / "checkpoints" / file
        if cached_file.is_file():
            return str(cached_file)
        try:
            cached_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached_file), progress=False)
        except Exception as exc:  # noqa: BLE001 - any failure means "no weights"
            raise ModelError(f"{what} are not in torch hub's cache ({cached_file.parent}) and could not be "
                             f"downloaded ({_short(exc, 160)}){fix}") from None
        return str(cached_file)
    raise ModelError(f"{what} do not exist: timm has none for this model{fix}")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"



def _build_failure(exc: BaseException, name: str, pretrained: bool, weights_file: str | None) -> str:
    """What to tell the user when timm could not build encoder ``name``."""
    if pretrained and weights_file:
        return f"model.weights_file {weights_file}: could not load it into encoder {name!r} ({_short(exc)})"
    if pretrained:
        return (
            f"could not get timm's ImageNet weights for encoder {name!r} ({_short(exc)}). "
            "On an offline machine set model.weights_file to a local timm state dict "
            "(.safetensors or .pth), or set model.pretrained: false for random initialisation"
        )
    return f"could not build encoder {name!r}: {_short(exc)}"


def feature_strides(encoder: nn.Module) -> list[int]:
    """Stride of each feature of an smp timm encoder, aligned with ``encoder.out_channels``.

    Returns:
        ``[1, 2, 4, ...]``: feature ``i`` of ``encoder(x)`` is ``H / strides[i]`` high (1: the input itself).
    """
    reductions = list(encoder.model.feature_info.reduction())
    if getattr(encoder, "_is_transformer_style", False):
        reductions = [2, *reductions]  # smp's empty H/2 placeholder
    strides = [1, *reductions]  # smp puts the input first
    if isinstance(encoder, FusedStride16Encoder):
        strides = [*strides[:-2], 16]
    return strides


def _register(encoder: type[TimmEncoder], **params: Any) -> str:
    """Put ``encoder`` with ``params`` into smp's registry; returns its name there.

    The name is a digest of the class and the params, so one encoder setting has one entry
    (registering it again is a no-op). smp's ``get_encoder`` calls ``encoder(**params, depth=,
    output_stride=)``; ``pretrained_settings`` stays empty because the networks pass
    ``encoder_weights=None`` and the encoder loads its weights itself.
    """
    text = json.dumps({"class": encoder.__qualname__, **params}, sort_keys=True)
    key = f"lggseg-{params['name']}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    entry = {"encoder": encoder, "params": params, "pretrained_settings": {}}
    known = smp_registry.setdefault(key, entry)
    if known["encoder"] is not encoder or known["params"] != params:
        raise ModelError(f"smp encoder registry: {key!r} is already taken by another encoder")
    return key


def deeplab_encoder(cfg: ModelConfig, name: str, image_size: int, joined_channels: int = 0) -> str:
    """smp registry name of DeepLabv3+'s encoder for ``cfg`` (timm model ``name``, square ``image_size`` inputs).

    A dilatable CNN becomes a :class:`TimmEncoder` built at ``cfg.output_stride``; an encoder timm
    cannot dilate a :class:`FusedStride16Encoder` (output stride 16 and ``image_size`` divisible by
    32 only). ``joined_channels`` is the width of the map joined to the deep feature (0: none).
    Bad settings raise :class:`ModelError` here, before anything is built.
    """
    kwargs = _timm_kwargs(name, image_size)
    weights_file = _weights_file(cfg, name, image_size)
    common = {
        "name": name,
        "pretrained": cfg.pretrained,
        "weights_file": weights_file,
        "joined_channels": int(joined_channels),
        "timm_kwargs": kwargs,
    }
    if _dilatable(name, cfg.output_stride, kwargs):
        return _register(TimmEncoder, **common)
    if cfg.output_stride != 16:
        raise ModelError(
            f"encoder {name!r} cannot be dilated, so it supports model.output_stride 16 only, not {cfg.output_stride}"
        )
    if image_size % 32:
        raise ModelError(
            f"encoder {name!r} (not dilatable) needs common.image_size divisible by 32, got {image_size}"
        )
    return _register(FusedStride16Encoder, **common, input_size=int(image_size))


def unet_encoder(cfg: ModelConfig, name: str, image_size: int) -> str:
    """smp registry name of the U-Net's encoder for ``cfg``: a :class:`TimmEncoder` at timm's own strides."""
    weights_file = _weights_file(cfg, name, image_size)
    return _register(
        TimmEncoder,
        name=name,
        pretrained=cfg.pretrained,
        weights_file=weights_file,
        joined_channels=0,
        timm_kwargs=_timm_kwargs(name, image_size),
    )
