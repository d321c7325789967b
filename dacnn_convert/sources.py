"""Model sources: turn a name into an ``nn.Module`` and load weights into it.

Four kinds of source are understood:

* ``resnet34``, ``vgg16_bn`` ... — a torchvision classification model;
* ``timm:resnet50d`` — a timm model;
* ``dacnn:18-mix-reg`` — one of the paper's DACNNs, built from scratch (:mod:`models`);
* ``my_pkg.models:make_net`` — a factory in the user's own code, imported only
  when given explicitly (never from a checkpoint's metadata, see :mod:`checkpoint`).

Weights are ``DEFAULT`` (the library's pretrained weights, downloaded once),
``none`` (random init) or a path to a state dict (``.safetensors`` or a
``torch.save``-d dict read with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import urllib.error
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnknownModelError, WeightsError, suggest

OFFLINE_HINT = (
    "use --weights none for random initialisation, or --weights PATH for a local "
    "state dict (.safetensors or .pt)"
)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: enough to rebuild its skeleton without the user's code."""

    kind: str  # "torchvision" | "timm" | "dacnn" | "module"
    name: str
    num_classes: int | None = None

    @property
    def display(self) -> str:
        """The spelling a user types on the command line."""
        return {"torchvision": self.name, "timm": f"timm:{self.name}", "dacnn": f"dacnn:{self.name}"}.get(
            self.kind, self.name
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(kind=str(data["kind"]), name=str(data["name"]), num_classes=data.get("num_classes"))


def parse_spec(text: str, num_classes: int | None = None) -> ModelSpec:
    """Parse ``resnet18`` / ``timm:resnet50d`` / ``pkg.mod:factory`` into a :class:`ModelSpec`.

    Raises:
        UnknownModelError: the name is in none of the sources; the message lists close names.
    """
    if text.startswith("dacnn:"):
        from .models.dacnn import NAME

        name = text[len("dacnn:") :]
        if NAME.match(name) is None:
            raise UnknownModelError(
                f"unknown DACNN {name!r}: names are dacnn:DEPTH-VARIANT[-reg[SECTIONS]][-free][-nobn], "
                "e.g. dacnn:18-mix-reg, dacnn:18-plain-reg3, dacnn:14-plain-free"
            )
        return ModelSpec("dacnn", name, num_classes)
    if text.startswith("timm:"):
        import timm

        name = text[len("timm:") :]
        if name not in timm.list_models():
            raise UnknownModelError(
                f"unknown timm model {name!r}.{suggest(name, timm.list_models())} "
                "See timm.list_models() for the names."
            )
        return ModelSpec("timm", name, num_classes)
    if ":" in text:
        return ModelSpec("module", text, num_classes)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if text not in names:
        raise UnknownModelError(
            f"unknown model {text!r}: not a torchvision classification model.{suggest(text, names)} "
            "Use timm:NAME for timm models or package.module:factory for your own code."
        )
    return ModelSpec("torchvision", text, num_classes)


def build_model(spec: ModelSpec, weights: str | Path | None = "DEFAULT") -> nn.Module:
    """Build the model named by ``spec`` and load ``weights`` into it.

    Args:
        spec: the model source.
        weights: ``"DEFAULT"`` for pretrained weights, ``None``/``"none"`` for random
            initialisation, or a path to a state dict.

    Raises:
        WeightsError: pretrained weights cannot be fetched (offline), or the file does
            not fit the model.
        UnknownModelError: a ``module:factory`` source cannot be imported.
    """
    pretrained = isinstance(weights, str) and weights.upper() == "DEFAULT"
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        path = None
    elif pretrained:
        path = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {str(path)!r} does not exist; {OFFLINE_HINT}")

    if spec.kind == "dacnn":
        if pretrained:
            raise WeightsError(
                f"there are no published weights for {spec.display}; train one (dacnn train {spec.display} "
                "--dataset cifar100 --out runs/x) and pass --weights runs/x/best.safetensors, or --weights none"
            )
        from .models.dacnn import from_name

        model = from_name(spec.name, spec.num_classes or 100)
    elif spec.kind == "module":
        model = _build_from_factory(spec)  # a user factory decides its own initialisation
    elif spec.kind == "timm":
        model = _build_timm(spec, pretrained)
    else:
        model = _build_torchvision(spec, pretrained)
    if path is not None:
        model.load_state_dict(read_state_dict(path, model), strict=True)
    return model


def _build_torchvision(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    if not pretrained and spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    with _download_errors(spec):
        model = torchvision.models.get_model(spec.name, weights="DEFAULT" if pretrained else None, **kwargs)
    if pretrained and spec.num_classes is not None:
        _reset_last_linear(model, spec.num_classes)
    return model


def _build_timm(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if not pretrained:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    with _download_errors(spec), _hub_offline_unless_reachable():
        return timm.create_model(spec.name, pretrained=True, **kwargs)


def _build_from_factory(spec: ModelSpec) -> nn.Module:
    module_name, _, attr = spec.name.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m` would: the user's code is usually where they run
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownModelError(
            f"cannot import {attr!r} from {module_name!r} ({exc}); a user model is given as "
            "package.module:factory and the package must be importable (pip install -e it)"
        ) from exc
    kwargs = {"num_classes": spec.num_classes} if spec.num_classes is not None else {}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"{spec.name} returned {type(model).__name__}, expected an nn.Module")
    return model


def _reset_last_linear(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier (the last ``nn.Linear``) to predict ``num_classes`` classes."""
    last = None
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            last = name
    if last is None:
        raise WeightsError("cannot change num_classes: the model has no nn.Linear classifier")
    old = model.get_submodule(last)
    if old.out_features == num_classes:
        return
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _offline_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, urllib.error.URLError, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from huggingface_hub import errors as hf_errors

        types.append(hf_errors.HfHubHTTPError)
        types.append(hf_errors.OfflineModeIsEnabled)
    return tuple(types)


@contextlib.contextmanager
def _download_errors(spec: ModelSpec) -> Iterator[None]:
    """Turn a failed pretrained download into a one-line :class:`WeightsError`."""
    try:
        yield
    except _offline_error_types() as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"cannot download pretrained weights for {spec.display} (offline?): {reason[:160]}; {OFFLINE_HINT}"
        ) from exc


@contextlib.contextmanager
def _hub_offline_unless_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> Iterator[None]:
    """Skip huggingface_hub's ~45 s of retries when the hub cannot be reached at all.

    With no route to the hub, offline mode still serves a cached file and fails at
    once otherwise; with a route, nothing changes.
    """
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        yield
        return
    except OSError:
        pass
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def read_state_dict(path: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``weights_only`` torch file.

    When ``model`` is given, the keys and shapes are checked against it so a wrong
    architecture or a wrong ``num_classes`` is reported before anything is loaded.

    Raises:
        WeightsError: the file is unreadable, not a state dict, or does not fit ``model``.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure means the same thing to the user
        if "Weights only load failed" in str(exc):
            raise WeightsError(
                f"refused to load {str(path)!r}: it pickles objects other than tensors, and .pt files are only read "
                "with torch.load(weights_only=True), so no code in them can run. If you trust its source, re-save "
                "its state dict as .safetensors"
            ) from exc
        raise WeightsError(
            f"cannot read weights file {str(path)!r}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{str(path)!r} is not a state dict (a mapping of names to tensors)")
    if model is not None:
        check_state_dict(state, model, str(path))
    return state


def check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Raise :class:`WeightsError` naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{where} does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); is it the same architecture?"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(tensor.shape)} (wrong --num-classes or architecture?)"
            )


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was made for: timm's pretrained config, else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    return (3, 224, 224)
