"""Model sources: turn a name into an ``nn.Module`` and load weights into it.

Five kinds of source are understood:

* ``resnet34``, ``vgg16_bn`` ... — a torchvision classification model;
* ``timm:resnet50d``, ``timm:resnet18.a1_in1k`` — a timm model, with or without a pretrained tag;
* ``hf-hub:timm/resnet18.a1_in1k`` — a timm model on the Hugging Face hub (timm's own spelling);
* ``dacnn:18-mix-reg`` — one of the paper's DACNNs, built from scratch (:mod:`models`);
* ``my_pkg.models:make_net`` — a factory in the user's own code, imported only
  when given explicitly (never from a checkpoint's metadata, see :mod:`checkpoint`).

Weights are ``DEFAULT`` (the library's pretrained weights, downloaded once), a torchvision
weight enum (``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``), ``none`` (random init)
or a path to a state dict (``.safetensors`` or a ``torch.save``-d dict read with
``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import urllib.error
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.kinds import plain_kind
from ..defaults import DEFAULT_INPUT_SIZE
from ..errors import UnknownModelError, UsageError, WeightsError, first_line, suggest
from .files import is_safetensors, unreadable

OFFLINE_HINT = (
    "use «weights=none» for random initialisation, or «weights=PATH» for a local state dict (.safetensors or .pt)"
)


SPEC_KINDS = ("torchvision", "timm", "dacnn", "module")
MAX_CLASSES = 1_000_000  # a classifier head wider than this is a tampered file, not a model (10^12 tried 64 TB)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: enough to rebuild its skeleton without the user's code."""

    kind: str  # "torchvision" | "timm" | "dacnn" | "module"
    name: str
    num_classes: int | None = None

    @property
    def display(self) -> str:
        """The spelling a user types on the command line."""
        if self.kind == "timm" and self.name.startswith("hf-hub:"):
            return self.name
        return {"torchvision": self.name, "timm": f"timm:{self.name}", "dacnn": f"dacnn:{self.name}"}.get(
            self.kind, self.name
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec a checkpoint's metadata describes, checked: a tampered kind, name or class count
        is refused here (ValueError), before a skeleton is built from it."""
        kind, name, classes = data.get("kind"), data.get("name"), data.get("num_classes")
        if kind not in SPEC_KINDS:
            raise ValueError(f"source kind {kind!r} is none of {', '.join(SPEC_KINDS)}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"source name {name!r} is not a model name")
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_CLASSES
        ):
            raise ValueError(f"num_classes {classes!r} is not an integer from 1 to {MAX_CLASSES:,}")
        return cls(kind=kind, name=name, num_classes=classes)


def parse_spec(text: str, num_classes: int | None = None) -> ModelSpec:
    """Parse ``resnet18`` / ``timm:resnet50d`` / ``pkg.mod:factory`` into a :class:`ModelSpec`.

    Raises:
        UnknownModelError: the name is in none of the sources; the message lists close names.
        UsageError: ``num_classes`` below 1.
    """
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise UsageError(
            f"«num-classes» must be from 1 to {MAX_CLASSES:,} (the classifier's outputs), got {num_classes:,}"
        )
    if text.startswith("dacnn:"):
        from ..core.models import NAME

        name = text[len("dacnn:") :]
        if NAME.match(name) is None:
            raise UnknownModelError(
                f"unknown DACNN {name!r}: names are dacnn:DEPTH-VARIANT[-reg[SECTIONS]][-free][-nobn|-sharedbn], "
                "e.g. dacnn:18-mix-reg, dacnn:18-plain-reg3, dacnn:14-plain-free"
            )
        return ModelSpec("dacnn", name, num_classes)
    if text.startswith("hf-hub:"):
        if "/" not in text[len("hf-hub:") :]:
            raise UnknownModelError(f"{text!r}: a hub model is hf-hub:OWNER/NAME, e.g. hf-hub:timm/resnet18.a1_in1k")
        return ModelSpec("timm", text, num_classes)  # timm.create_model reads hf-hub: names itself
    if text.startswith("timm:"):
        import timm

        name = text[len("timm:") :]
        if not timm.is_model(name):  # accepts pretrained tags (resnet18.a1_in1k), as timm does
            raise UnknownModelError(
                f"unknown timm model {name!r}.{suggest(name.partition('.')[0], timm.list_models())} "
                "See timm.list_models() for the names and timm.list_pretrained() for their tags."
            )
        arch, _, tag = name.partition(".")
        if tag:  # timm.is_model ignores the tag: check it against the architecture's pretrained tags
            tags = timm.list_pretrained(f"{arch}.*")
            if name not in tags:
                raise UnknownModelError(
                    f"timm model {arch!r} has no pretrained tag {tag!r}.{suggest(name, tags)} "
                    f"Its tags: {', '.join(t.partition('.')[2] for t in tags) or 'none'}"
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
    enum = torchvision_weights(spec, weights) if isinstance(weights, str) else None
    pretrained = enum is not None or (isinstance(weights, str) and weights.upper() == "DEFAULT")
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        path = None
    elif pretrained:
        path = None
    else:
        path = Path(weights)
        why = unreadable(path, "weights file")
        if why is not None and not path.exists():
            names = _weight_names(spec)
            also = f"; {spec.name}'s pretrained weights are {', '.join(names)}" if names else ""
            raise WeightsError(f"{why}{also}; {OFFLINE_HINT}")
        if why is not None:
            raise WeightsError(why)

    model: nn.Module
    if spec.kind == "dacnn":
        if pretrained:
            raise WeightsError(
                f"there are no published weights for {spec.display}; train one (dacnn train {spec.display} "
                "--dataset cifar100 --out runs/x) and pass «weights=runs/x/best.safetensors», or «weights=none»"
            )
        from ..core.models import from_name

        model = from_name(spec.name, spec.num_classes or 100)
    elif spec.kind == "module":
        model = _build_from_factory(spec)  # a user factory decides its own initialisation
    elif spec.kind == "timm":
        model = _build_timm(spec, pretrained)
    else:
        model = _build_torchvision(spec, enum or ("DEFAULT" if pretrained else None))
    if path is not None:
        model.load_state_dict(with_module_versions(read_state_dict(path, model), model), strict=True)
    return model


def torchvision_weights(spec: ModelSpec, weights: str) -> Any:
    """The torchvision weight enum ``weights`` names for ``spec`` (``IMAGENET1K_V2``,
    ``ResNet50_Weights.IMAGENET1K_V2`` or ``DEFAULT``), or None when it names none."""
    if spec.kind != "torchvision" or weights.lower() == "none":
        return None
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(spec.name)
    except (ValueError, KeyError):
        return None
    member = weights.rpartition(".")[2] if weights.partition(".")[0] == enum.__name__ else weights
    member = "DEFAULT" if member.upper() == "DEFAULT" else member
    return enum[member] if member in enum.__members__ else None


def _weight_names(spec: ModelSpec) -> list[str]:
    if spec.kind != "torchvision":
        return []
    import torchvision

    try:
        return list(torchvision.models.get_model_weights(spec.name).__members__)
    except (ValueError, KeyError):
        return []


def _build_torchvision(spec: ModelSpec, weights: Any) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    if weights is None and spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    with _download_errors(spec):
        model = torchvision.models.get_model(spec.name, weights=weights, **kwargs)
    if weights is not None and spec.num_classes is not None:
        _reset_last_linear(model, spec.num_classes)
    return model


def _build_timm(spec: ModelSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {}
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if not pretrained and not spec.name.startswith("hf-hub:"):  # hub names fetch their config even so
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    with _download_errors(spec), _hub_offline_unless_reachable():
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The working directory on ``sys.path`` for one import, as ``python -m`` would have it (the
    user's code is usually where they run); ``sys.path`` is as it was afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _build_from_factory(spec: ModelSpec) -> nn.Module:
    module_name, _, attr = spec.name.partition(":")
    try:
        with _cwd_importable():
            factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownModelError(
            f"cannot import {attr!r} from {module_name!r} ({exc}); a user model is given as "
            "package.module:factory and the package must be importable (pip install -e it)"
        ) from exc
    if not callable(factory):
        raise UnknownModelError(f"{spec.name} is a {type(factory).__name__}, not a function that builds a model")
    kwargs = {"num_classes": spec.num_classes} if spec.num_classes is not None else {}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError:
        takes = "a num_classes keyword" if kwargs else "no arguments"
        raise UnknownModelError(
            f"{spec.name}{inspect.signature(factory)} cannot be called with {takes}: a model factory is called as "
            "factory(num_classes=N) when «num-classes» is given, else factory()"
        ) from None
    except ValueError:  # a builtin without a signature: call it and see
        pass
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise UnknownModelError(f"{spec.name}() raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"{spec.name} returned {type(model).__name__}, expected an nn.Module")
    return model


def _reset_last_linear(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier (the last ``nn.Linear``) to predict ``num_classes`` classes."""
    last: str | None = None
    for name, module in model.named_modules():
        if plain_kind(module) is nn.Linear:
            last = name
    if last is None:
        raise WeightsError("cannot change num_classes: the model has no nn.Linear classifier")
    old = model.get_submodule(last)
    assert isinstance(old, nn.Linear)  # named_modules() found it as an nn.Linear under this name
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
        reason = first_line(exc)
        if spec.name.startswith("hf-hub:"):  # its architecture itself is on the hub (config.json), weights or not
            raise WeightsError(
                f"cannot fetch {spec.display} from the hub (offline?): {reason[:160]}; a hub model's architecture is "
                "read from the hub even with «weights=none»: offline, name the architecture from timm (timm:NAME) "
                "and give «weights=PATH» for its weights"
            ) from exc
        raise WeightsError(
            f"cannot download pretrained weights for {spec.display} (offline?): {reason[:160]}; {OFFLINE_HINT}"
        ) from exc


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can the hub client reach its endpoint, with its own settings?

    Asked the way huggingface_hub itself would connect: its endpoint (``HF_ENDPOINT``, so
    mirrors count), its HTTP session (proxies from the environment) and its offline flag
    (``HF_HUB_OFFLINE=1`` means no).
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:  # any transport failure (httpx or requests, by hub version) means unreachable
        return False
    return True


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout_s: float = 3.0) -> Iterator[None]:
    """Skip huggingface_hub's ~45 s of retries when the hub cannot be reached at all.

    With no route to the hub, the download runs in the hub's offline mode for its duration
    only (the flag is put back afterwards): a cached file is still served, anything else
    fails at once with the one-line offline error; with a route, nothing changes.
    """
    if hub_reachable(timeout_s):
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def fill_tied(
    state: dict[str, torch.Tensor], tied_json: str | None, path: str | Path, error: type[Exception] = WeightsError
) -> dict[str, str]:
    """Put back in ``state`` the weights a dacnn file stored once because the model ties them (its
    ``tied`` metadata, ``{alias: stored key}``); returns those ties. Malformed metadata raises ``error``."""
    import json

    if tied_json is None:
        return {}
    try:
        tied = json.loads(tied_json)
        ok = isinstance(tied, dict) and all(isinstance(a, str) and v in state for a, v in tied.items())
    except (json.JSONDecodeError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise error(f"{str(path)!r} has malformed 'tied' metadata; was it edited?")
    for alias, key in tied.items():
        state[alias] = state[key]
    return tied


# where training scripts put the weights in a checkpoint dict ({"state_dict": ..., "epoch": 3}), in order
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def _holds_tensors(obj: object) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(
    state: dict[Any, Any], path: Path, error: type[Exception]
) -> tuple[dict[Any, Any], tuple[str, ...]]:
    """The state dict of a torch file and a note of where it was: the file's top level, or the first
    of :data:`STATE_DICT_KEYS` holding tensors when the top level holds none (a training checkpoint).
    ``--weights`` and ``inspect`` read the same layouts.

    Raises:
        error: entries but no tensors, at the top level or under any of those keys.
    """
    if _holds_tensors(state) or not state:
        return state, ()
    for key in STATE_DICT_KEYS:
        if _holds_tensors(state.get(key)):
            rest = ", ".join(map(str, (k for k in state if k != key)))[:120]
            return state[key], (
                f"read the state dict under key {key!r}" + (f" (the file also holds: {rest})" if rest else ""),
            )
    keys = ", ".join(map(repr, list(state)[:8]))
    raise error(
        f"{str(path)!r} holds no tensors at its top level (keys: {keys}) nor under "
        f"{', '.join(map(repr, STATE_DICT_KEYS))}; save the model's state_dict() itself"
    )


def read_state_dict(path: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``weights_only`` torch file.

    When ``model`` is given, the keys and shapes are checked against it so a wrong
    architecture or a wrong ``num_classes`` is reported before anything is loaded.

    Raises:
        WeightsError: the file is unreadable, not a state dict, or does not fit ``model``.
    """
    try:
        if path.suffix == ".safetensors" or is_safetensors(path):  # by content too: a .pth may be safetensors
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                fill_tied(state, (f.metadata() or {}).get("tied"), path)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure means the same thing to the user
        if "Weights only load failed" in str(exc):
            raise WeightsError(
                f"refused to load {str(path)!r}: it pickles objects other than tensors, and .pt files are only read "
                "with torch.load(weights_only=True), so no code in them can run. If you trust its source, re-save "
                "its state dict as .safetensors"
            ) from exc
        why = first_line(exc, 160)
        raise WeightsError(f"cannot read weights file {str(path)!r}: {why}") from exc
    if isinstance(state, dict) and any(isinstance(k, str) and k.startswith("dacnn_anchors.") for k in state):
        raise WeightsError(
            f"{str(path)!r} is already converted by dacnn-convert (it holds shared anchors): «weights» takes the "
            "original model's weights; evaluate, export or fine-tune the converted file itself (dacnn eval FILE, "
            "dacnn export FILE, load(FILE))"
        )
    if isinstance(state, dict):
        state, _ = unwrap_state_dict(state, path, WeightsError)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{str(path)!r} is not a state dict (a mapping of names to tensors)")
    if model is not None:
        check_state_dict(state, model, str(path))
    return state


def with_module_versions(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` carrying the per-module ``version`` metadata of ``model``'s own state dict.

    safetensors stores tensors only, and some modules refuse a state dict without the version
    their class writes (torchvision's MNASNet: "version should be set to 1 or 2"). A state that
    already carries versions (a torch.save'd state dict) keeps its own.
    """
    if getattr(state, "_metadata", None) is not None:
        return dict(state) if not isinstance(state, dict) else state
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


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
                f"{tuple(tensor.shape)} (wrong «num-classes» or architecture?)"
            )
        if tensor.is_floating_point() and not (state[key].is_floating_point() or state[key].dtype == torch.int8):
            raise WeightsError(
                f"{where}: {key} is stored as {str(state[key].dtype).removeprefix('torch.')}, the model's is "
                f"{str(tensor.dtype).removeprefix('torch.')}: the file was altered, or is not this model's weights"
            )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConfig:
    """How a model's pretrained weights expect their images: size, normalisation, crop, resampling."""

    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875  # validation: resize to size / crop_pct, centre-crop size
    interpolation: str = "bilinear"


def input_config(model: nn.Module | None, spec: ModelSpec | None = None, weights: str | None = None) -> InputConfig:
    """The model's own preprocessing: timm's data config, torchvision's ``weights.transforms()``.

    ``model`` may be None: timm names are then looked up in timm's registry of pretrained
    configs (no model is built), torchvision names by their weight enum. Without either (a
    user model, random weights) the ImageNet convention: 224 px, ImageNet mean and std, 87.5%
    centre crop, bilinear.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if model is None and spec is not None and spec.kind == "timm" and not spec.name.startswith("hf-hub:"):
        import timm.models

        found = timm.models.get_pretrained_cfg(spec.name, allow_unregistered=True)
        cfg = found.to_dict() if found is not None else None
    if isinstance(cfg, dict) and "input_size" in cfg:
        import timm.data

        data = (
            timm.data.resolve_data_config({}, model=model)
            if model is not None
            else timm.data.resolve_data_config({}, pretrained_cfg=cfg)
        )
        c, h, w = data["input_size"]
        return InputConfig(
            (int(c), int(h), int(w)),
            tuple(data["mean"]),
            tuple(data["std"]),
            float(data.get("crop_pct", 0.875)),
            str(data.get("interpolation", "bilinear")),
        )
    enum = torchvision_weights(spec, weights or "DEFAULT") if spec is not None else None
    if enum is not None:
        t = enum.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        return InputConfig((3, crop, crop), tuple(t.mean), tuple(t.std), crop / resize, str(interp))
    return InputConfig()


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was made for: its pretrained config (:func:`input_config`), else 3x224x224."""
    return input_config(model).input_size
