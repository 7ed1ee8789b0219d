"""Classifier checkpoints for evaluation: one loader for our trainers' files, torchvision state_dicts and
timm checkpoints, and the (features, linear head) split that OOD postprocessors need.

    model, classes, info = load_classifier("runs/rn50/last.pt", device)
    fh = features_and_head(model)        # fh.features(x) -> [B, D]; fh.head: nn.Linear(D, K)

Accepted files (always read with ``weights_only=True``):
- our trainers' checkpoints ``{"model": sd, "settings": {"arch", "image_size", "resize_size", ...},
  "classes": [...]}``; with ``settings["model_source"] == "timm"`` the model is
  ``timm.create_model(arch, num_classes=len(classes), **settings["model_kwargs"])`` (the ViT trainer);
- a plain state_dict (torchvision's ``resnet50-*.pth``; a DDP ``module.`` prefix is dropped), or timm's
  DeiT-style ``{"model": sd}``, or a ``.safetensors`` file: ``arch`` names the torchvision or timm model
  (default resnet50), and the classes come from ``classes_file`` (the trainer's ``classes.json``
  ``{"root", "classes"}`` or a JSON list), else they are named "0".."K-1" after the head's rows.
Every user mistake is one ``SystemExit`` line naming the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..data.base import INTERPOLATIONS
from ..runs import RunError, load_checkpoint_file
from .ensemble import IMAGENET_MEAN, IMAGENET_STD, eval_resize

__all__ = ["load_classifier", "read_classes", "features_and_head", "FeatureHead", "with_normalization"]


def read_classes(path: str | Path) -> list[str]:
    """Class names from the trainer's classes.json ({"root", "classes"}), a JSON list, or one name a line."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--classes {path}: no such file")
    text = p.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(data, dict):
        data = data.get("classes")
    if not isinstance(data, list) or not data or not all(isinstance(c, (str, int)) for c in data):
        raise SystemExit(f"--classes {path}: expected a JSON list of class names or the trainer's classes.json "
                         '({"root": ..., "classes": [...]})')
    return [str(c) for c in data]


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - one readable line for any damaged file
            raise SystemExit(f"--ckpt {path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    try:
        return load_checkpoint_file(path)
    except RunError as e:
        raise SystemExit(f"--ckpt {e}") from None


def _head_rows(sd: dict[str, torch.Tensor]) -> int | None:
    """Rows of the classifier head: the last 2-D weight (fc / head / classifier) of a state_dict."""
    for key in reversed(list(sd)):
        if key.endswith("weight") and sd[key].dim() == 2:
            return sd[key].shape[0]
    return None


def _build(arch: str, num_classes: int, source: str | None, kwargs: dict) -> tuple[nn.Module, str]:
    if source != "timm" and arch in torchvision.models.list_models():
        return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs), "torchvision"
    import timm

    if not timm.is_model(arch):
        raise SystemExit(f"--arch {arch}: neither a torchvision nor a timm model name")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs), "timm"


def load_classifier(path: str | Path, device: torch.device | str = "cpu", arch: str | None = None,
                    classes_file: str | Path | None = None) -> tuple[nn.Module, list[str], dict]:
    """(model in eval mode on ``device``, class names in output order, info).

    info: {"arch", "source" ("torchvision" | "timm"), "crop_size", "resize_size", "crop_ratio", "interpolation",
    "protocol" (where the evaluation view comes from, see ``_protocol``), "mean", "std", "classes_known" (False
    when the names were made up from the head's size)}. The model takes
    mean/std-normalized images (``with_normalization`` gives a [0, 1]-input view of it).
    """
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--ckpt {path}: no such file")
    ck = _read(p)
    settings, classes, source, kind = {}, None, None, "a bare state_dict"
    if isinstance(ck, dict) and "model" in ck and _is_state_dict(ck["model"]):
        sd, kind = ck["model"], "a trainer checkpoint" if ck.get("settings") else "a {'model': state_dict} file"
        settings = ck.get("settings") or {}
        classes = [str(c) for c in ck["classes"]] if ck.get("classes") else None
        source = settings.get("model_source")
    elif _is_state_dict(ck):
        sd = ck
    else:
        raise SystemExit(f"--ckpt {path}: neither a trainer checkpoint, a {{'model': state_dict}} file nor a "
                         "state_dict of a classifier")
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    rows = _head_rows(sd)
    known = True
    if classes_file is not None:
        listed = read_classes(classes_file)
        if classes is not None and listed != classes:
            raise SystemExit(f"--classes {classes_file} lists {len(listed)} classes that differ from the "
                             f"{len(classes)} stored in {path}; drop --classes to use the checkpoint's")
        classes = listed
    if classes is None:
        if rows is None:
            raise SystemExit(f"--ckpt {path}: no classifier head found; pass --classes classes.json")
        classes, known = [str(i) for i in range(rows)], False
    if rows is not None and rows != len(classes):
        raise SystemExit(f"--ckpt {path} has a {rows}-class head, but {len(classes)} classes are listed "
                         f"({'--classes ' + str(classes_file) if classes_file else 'in the checkpoint'}): "
                         "use the classes file of the run that trained it")
    arch = arch or settings.get("arch") or "resnet50"
    model, source = _build(arch, len(classes), source, dict(settings.get("model_kwargs") or {}))
    own = model.state_dict()  # compared before loading: load_state_dict raises a many-line error on shapes
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    wrong = [k for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = (f"shape of {wrong[0]}: checkpoint {tuple(sd[wrong[0]].shape)}, model "
                f"{tuple(model.state_dict()[wrong[0]].shape)}" if wrong else
                f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        raise SystemExit(f"--ckpt {path} ({kind}) does not fit {source} {arch} with {len(classes)} classes: {what}; "
                         "pass the architecture it was trained with as --arch")
    model.load_state_dict(sd)
    # our trainers normalize with the loader's ImageNet mean/std unless their settings say otherwise; a timm
    # model's pretrained_cfg (e.g. 0.5/0.5 for ViTs) applies only to timm's own checkpoints
    cfg = {} if settings else (getattr(model, "pretrained_cfg", None) or {})
    crop = int(settings.get("image_size", 224))
    ratio, interp, how = _protocol(settings, cfg, source, arch, crop)
    info = {"arch": arch, "source": source, "classes_known": known, "crop_size": crop,
            "resize_size": eval_resize(crop, ratio), "crop_ratio": ratio, "interpolation": interp, "protocol": how,
            "mean": tuple(settings.get("mean") or cfg.get("mean") or IMAGENET_MEAN),
            "std": tuple(settings.get("std") or cfg.get("std") or IMAGENET_STD)}
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, classes, info


def _protocol(settings: dict, cfg: dict, source: str, arch: str, crop: int) -> tuple[float, str, str]:
    """(crop ratio, interpolation, where they come from) of the evaluation view for a checkpoint.

    Ours: the recipe's ``eval_crop_ratio`` / ``eval_interpolation`` (rn50: 0.875 bilinear, DiffAug's and
    torchvision's Resize 256 + CenterCrop 224; vit: 1.0 bicubic, DeiT-III's), else (older runs) the run's
    DiffAug view, image_size / resize_size, bilinear. A timm state_dict: its pretrained_cfg (deit3_*: 1.0
    bicubic). A torchvision state_dict: Resize 256 + CenterCrop 224 bilinear."""
    if settings:
        ratio = settings.get("eval_crop_ratio") or crop / int(settings.get("resize_size", 256))
        return float(ratio), settings.get("eval_interpolation") or "bilinear", "the checkpoint's recipe"
    if source == "timm" and cfg.get("crop_pct"):
        interp = cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bilinear"
        return float(cfg["crop_pct"]), interp, f"timm's pretrained_cfg of {arch}"
    return 224 / 256, "bilinear", "torchvision's reference evaluation"


class _Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def with_normalization(model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> nn.Module:
    """A view of ``model`` that takes [0, 1] images [B, C, H, W] (what ``Smooth`` feeds) and normalizes them."""
    return _Normalized(model, mean, std).to(next(model.parameters()).device).eval()


@dataclass
class FeatureHead:
    """features(x normalized [B, C, H, W]) -> penultimate features [B, D]; head: the final nn.Linear(D, K),
    so head(features(x)) == model(x)."""

    features: Callable[[torch.Tensor], torch.Tensor]
    head: nn.Linear


def features_and_head(model: nn.Module) -> FeatureHead:
    """Split a classifier into penultimate features and its linear head.

    timm models: ``forward_head(forward_features(x), pre_logits=True)`` and ``get_classifier()``;
    torchvision ResNets (and anything with ``avgpool`` + ``fc``): the trunk up to the flattened pool and
    ``fc``; any other module that exposes ``forward_features(x) -> [B, D]`` and a Linear ``head`` or ``fc``.
    """
    if hasattr(model, "forward_head") and hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            return FeatureHead(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), head)
    if isinstance(getattr(model, "fc", None), nn.Linear) and hasattr(model, "avgpool") and hasattr(model, "layer4"):
        def resnet_features(x: torch.Tensor) -> torch.Tensor:
            m = model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            return torch.flatten(m.avgpool(x), 1)

        return FeatureHead(resnet_features, model.fc)
    head = getattr(model, "head", None) or getattr(model, "fc", None)
    if hasattr(model, "forward_features") and isinstance(head, nn.Linear):
        return FeatureHead(model.forward_features, head)
    raise ValueError(f"{type(model).__name__}: cannot find penultimate features and a linear head; give it "
                     "forward_features(x) -> [B, D] and a Linear `head` (or use a torchvision ResNet / timm model)")
