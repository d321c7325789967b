"""Recipes: the one typed configuration of a run, for Python, YAML files and the CLI alike.

    model: resnet34            # any model source, or a DACNN builder name like dacnn:18-mix-reg
    mode: mix
    regulators: all
    dataset: cifar100
    epochs: 90

Read with yaml's SafeLoader only (no tags, no code). A key given twice, unknown keys, wrong
types and values out of range are refused with the key named; command-line flags override the
file, and the resolved recipe is written next to the results (``recipe.yaml``). Every option of
``dacnn-convert``, ``dacnn distill``, ``dacnn train`` and ``dacnn bench`` is a field here of the
same name (``--target-params`` is ``target_params``), except the actions of one invocation:
``--recipe``, ``--dry-run``, ``--resume`` and ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .amounts import parse_amount
from .defaults import (
    CALIB_BATCHES,
    FINETUNE_LR,
    FINETUNE_WARMUP_STEPS,
    RESCORE_ROUNDS,
    SCORE_BATCHES,
    SEED_MAX,
    TRAIN_LR,
)
from .errors import RecipeError, UsageError, deprecated, first_line, marked, suggest
from .io.files import not_a_folder, unreadable
from .names import FEATURE_LOSSES

TASKS = ("convert", "train", "bench")


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """The values each choice field takes: the library's own registries and lists (imported when
    a recipe is first checked, so reading this module does not import torch)."""
    from .budget import METRICS
    from .core.plan import REGULATOR_INITS
    from .core.planning import INITS, MODES, REGULATOR_STYLES
    from .io.checkpoint import DTYPES
    from .names import PRUNE_IMPORTANCES
    from .train.config import OPTIMIZERS, PRECISIONS, SCHEDULES
    from .train.data import AUGMENTS

    return {
        "mode": tuple(MODES),
        "regulator_style": REGULATOR_STYLES,
        "regulator_init": REGULATOR_INITS,
        "init": INITS,
        "metric": METRICS,
        "dtype": (*DTYPES, "int8"),
        "feature_loss": FEATURE_LOSSES,
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "precision": PRECISIONS,
        "augment": AUGMENTS,
        "prune_importance": PRUNE_IMPORTANCES,
    }


@dataclass(frozen=True)
class Recipe:
    """Every setting of a conversion (+ distillation) or a from-scratch training run.

    ``task: convert`` runs ``dacnn-convert`` (with ``dataset``: calibrate and distil);
    ``task: train`` trains ``model`` from scratch, as the paper's tables do; ``task: bench``
    compares ``methods`` at one size (``dacnn bench --recipe``). ``paper_*`` keys record what
    the paper reports for this row, so results can be put side by side.
    """

    task: str = "convert"
    model: str | None = None
    weights: str | None = None  # None: DEFAULT (pretrained) to convert, none (random init) to train
    num_classes: int | None = None
    input_size: str | None = None
    mode: str = "mix"
    regulators: str = "none"
    regulator_style: str = "adapter"
    regulator_init: str | None = None  # fit | zero; None: defaults.REGULATOR_INIT
    reconstruct: bool | None = None  # section-wise reconstruction; None: defaults.default_reconstruct
    bank_size: str = "0.5"
    factorize_unshared: str | None = None
    share: str | None = None  # named banks: layer names or patterns, comma-separated, groups separated by ;
    init: str | None = None
    leaf_module: str | None = None  # comma-separated package.module.Class names fx must not trace into
    target_params: int | str | None = None  # plan by budget: 6M, 600K or an integer
    target_ratio: float | None = None
    target_bytes: int | str | None = None
    target_macs: int | str | None = None  # MACs per example (40M) or how many times fewer (4x); with or without a size
    target_latency: float | None = None  # ms per batch of latency_batch on this machine, measured
    latency_batch: int = 1
    metric: str | None = None  # fit | kl: the budget search's score
    score_batches: int = SCORE_BATCHES  # calibration batches the budget search scores on
    rescore_rounds: int = RESCORE_ROUNDS  # rounds of whole-plan re-scoring after the search (kl; 0: none)
    prune: float | str | None = None  # channel pruning before sharing: a fraction in (0, 1) or auto (searched)
    prune_importance: str = "group"  # group | l1: how pruning ranks channels
    share_across: bool = False  # merge the searched banks across stages where that scores better
    dtype: str = "fp32"  # storage of the written model: fp32 | fp16 | bf16 | int8
    dataset: str | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float | None = None  # None: 0.05 for task train (from scratch), defaults.FINETUNE_LR for convert
    warmup_steps: int | None = None  # None: 0 for task train, defaults.FINETUNE_WARMUP_STEPS for convert
    optimizer: str = "sgd"
    schedule: str = "cosine"
    step_every: int = 0
    weight_decay: float = 5e-4
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    calib_batches: int = CALIB_BATCHES
    precision: str = "auto"
    limit_batches: int | None = None
    train_limit: int | None = None
    augment: str = "auto"
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    feature_loss: str = "none"  # none | mse: also match stage outputs of teacher and student
    feature_weight: float = 1.0
    checkpoint_every: int | None = None
    channels_last: bool = True
    plot: bool = False
    download: bool = False
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    methods: str | None = None  # bench: comma-separated method names
    budget: float | None = None  # bench: size as a fraction of the teacher's parameters
    match: str | None = None  # bench: prune to the size of this anchoring method
    budget_macs: float | None = None  # bench: compute as a fraction of the teacher's MACs
    repeats: int = 1  # bench: seeds per method
    latency_repeats: int = 20
    paper_table: str | None = None
    paper_row: str | None = None
    paper_params: float | None = None
    paper_error: float | None = None

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{name} must be a finite number, got {value}")
        if self.task not in TASKS:
            raise RecipeError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name, allowed in choices().items():  # a typo must fail at load, not after a fine-tune
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise RecipeError(f"{name} must be one of {', '.join(allowed)}, got {value!r}{suggest(value, allowed)}")
        for name in ("epochs", "batch_size", "repeats", "latency_repeats"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("calib_batches", "seed", "step_every", "warmup_steps", "limit_batches", "train_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise RecipeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed > SEED_MAX:
            raise RecipeError(f"seed must be <= {SEED_MAX} (32 bits), got {self.seed}")
        if self.lr is not None and not self.lr > 0:
            raise RecipeError(f"lr must be > 0, got {self.lr}")
        for name in ("label_smoothing", "feature_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise RecipeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise RecipeError(f"budget is a fraction of the teacher's parameters in (0, 1), got {self.budget}")
        if self.budget_macs is not None and not 0 < self.budget_macs < 1:
            raise RecipeError(f"budget_macs is a fraction of the teacher's MACs in (0, 1), got {self.budget_macs}")

    @property
    def resolved_lr(self) -> float:
        """The peak learning rate: as written, else the default of the recipe's task."""
        if self.lr is not None:
            return self.lr
        return TRAIN_LR if self.task == "train" else FINETUNE_LR

    @property
    def resolved_warmup_steps(self) -> int:
        """Linear warm-up steps: as written, else the default of the recipe's task."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 0 if self.task == "train" else FINETUNE_WARMUP_STEPS

    def train_config(self, **runtime: Any) -> Any:
        """The training loop's settings of this recipe (:class:`dacnn_convert.TrainConfig`), the
        task's defaults resolved; ``runtime`` adds what a run decides, e.g. ``catch_signals``."""
        from .train import TrainConfig

        return TrainConfig(
            epochs=self.epochs,
            lr=self.resolved_lr,
            optimizer=self.optimizer,
            schedule=self.schedule,
            step_every=self.step_every,
            weight_decay=self.weight_decay,
            warmup_steps=self.resolved_warmup_steps,
            label_smoothing=self.label_smoothing,
            clip_grad=self.clip_grad,
            kd_temperature=self.kd_temperature,
            kd_alpha=self.kd_alpha,
            feature_weight=self.feature_weight if self.feature_loss == "mse" else 0.0,
            precision=self.precision,
            limit_batches=self.limit_batches,
            checkpoint_every=self.checkpoint_every,
            channels_last=self.channels_last,
            seed=self.seed,
            **runtime,
        )

    def anchor_config(self) -> Any:
        """What this recipe shares (:class:`dacnn_convert.AnchorConfig`): the recipe's plan keys, the
        sizes parsed as the command line writes them (``6M``, ``12MB``, a rank ``0.25``)."""
        from .config import AnchorConfig

        return AnchorConfig(
            mode=self.mode,
            regulators=self.regulators,
            regulator_style=self.regulator_style,
            regulator_init=self.regulator_init,
            init=self.init,
            bank_size=self.bank_size,
            factorize_unshared=parse_rank(self.factorize_unshared, "«factorize-unshared»"),
            share=self.share or (),
            target_params=parse_amount(_text(self.target_params), "«target-params»"),
            target_ratio=self.target_ratio,
            target_bytes=parse_amount(_text(self.target_bytes), "«target-bytes»"),
            target_macs=self.target_macs,
            target_latency=self.target_latency,
            latency_batch=self.latency_batch,
            metric=self.metric,
            score_batches=self.score_batches,
            rescore_rounds=self.rescore_rounds,
            prune=self.prune,
            prune_importance=self.prune_importance,
            share_across=self.share_across,
        )

    def resolved(self) -> Recipe:
        """This recipe with every task-dependent default written out (what recipe.yaml records)."""
        return self.override(lr=self.resolved_lr, warmup_steps=self.resolved_warmup_steps)

    def to_yaml(self) -> str:
        """The recipe as flat YAML (defaults included), as written next to results."""
        import yaml

        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    def override(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied (flags given on the command line); None values are ignored."""
        return _build({**dataclasses.asdict(self), **{k: v for k, v in changes.items() if v is not None}}, "flags")


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (int, float, str, or X | None); bools are not numbers."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for t in options:
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t in (int, str) and isinstance(value, t) and not isinstance(value, bool):
            return True
        if t is bool and isinstance(value, bool):
            return True
    return False


# keys renamed since 0.1.0: still read for one release, with a DeprecationWarning
RENAMED_KEYS = {"calibrate_batches": "calib_batches"}


def _build(data: dict[str, Any], where: str) -> Recipe:
    hints = typing.get_type_hints(Recipe)
    known = [f.name for f in fields(Recipe)]
    for old, new in RENAMED_KEYS.items():
        if old in data:
            if new in data:
                raise RecipeError(f"{where}: {old} and {new} are the same key (its old and new name): keep {new}")
            deprecated(f"the recipe key {old} ({where})", f"write {new}", stacklevel=4)
            data = {new if k == old else k: v for k, v in data.items()}
    for key, value in data.items():
        if not isinstance(key, str):
            raise RecipeError(f"{where}: keys are names like epochs, got {key!r} ({type(key).__name__})")
        if key not in known:
            raise RecipeError(f"{where}: unknown key {key!r}.{suggest(key, known)} Valid keys: {', '.join(known)}")
        if not _accepts(hints[key], value):
            words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
            options = typing.get_args(hints[key]) or (hints[key],)
            expected = " or ".join(words[t] for t in options)
            raise RecipeError(f"{where}: {key} must be {expected}, got {value!r} ({type(value).__name__})")
    try:
        return Recipe(**data)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {marked(exc)}") from None


def user_code(model: str | None) -> str | None:
    """The ``package.module:factory`` a model source names, or None for a built-in source
    (torchvision names, ``timm:``, ``hf-hub:``, ``dacnn:``): importing it runs the user's code."""
    if model is None or ":" not in model or model.startswith(("timm:", "hf-hub:", "dacnn:")):
        return None
    return model


def check_recipe_code(recipe: Recipe, path: str | Path, named: str | None, leaf_named: bool = False) -> None:
    """A recipe may make the tool import user code only when the command line names it too.

    A recipe is data: reading one must never import a module from the working folder or the
    path (docs/reliability.md, Security). A model named on the command line replaces the
    recipe's (its code is then never imported) or, naming the same ``package.module:factory``,
    is the consent; leaf modules (``leaf_module: pkg.mod.Cls``) need ``--leaf-module`` likewise.

    Raises:
        UsageError: the recipe names user code that the command line does not.
    """
    code = user_code(recipe.model)
    if code is not None and named is None:
        raise UsageError(
            f"{path} names user code as its model ({code}); code is imported only when named on the "
            f"command line: give {code} as the MODEL (or --model) to run it"
        )
    if recipe.leaf_module and not leaf_named:
        raise UsageError(
            f"{path} names leaf module classes ({recipe.leaf_module}), which are imported to be found; code is "
            "imported only when named on the command line: repeat them with --leaf-module"
        )


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file.

    Raises:
        RecipeError: the file is missing, not flat YAML, or has unknown keys, wrong types or bad values.
    """
    import yaml

    path = Path(path)
    why = unreadable(path, "recipe")
    if why is not None:
        hint = "; `dacnn recipe list` shows the bundled ones" if not path.exists() else ""
        raise RecipeError(why + hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = _safe_load_unique(text) or {}
    except _DuplicateKey as exc:
        raise RecipeError(
            f"{path}: key {exc.key!r} is given twice (lines {exc.first} and {exc.again}); YAML would keep the "
            "last one without a word: delete the line you do not mean"
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply; a recipe is a flat mapping of key: value lines") from None
    if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
        raise RecipeError(f"{path}: a recipe is a flat mapping of key: value lines")
    return _build(data, str(path))


class _DuplicateKey(Exception):
    """A mapping of a YAML file gives one key twice (``key``, at 1-based lines ``first`` and ``again``)."""

    def __init__(self, key: object, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is given twice (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


def _safe_load_unique(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice (raises :class:`_DuplicateKey`)."""
    loader = _unique_key_loader()(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.cache
def _unique_key_loader() -> type:
    """yaml's SafeLoader (no tags, no code) that refuses a key given twice in one mapping, where
    YAML keeps the last value silently (``epochs: 1`` then ``epochs: 5`` would train 5)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # a merge (<<) may be overridden; other non-scalar keys are refused later
                    key = self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def find_recipes(root: str | Path = "recipes") -> list[Path]:
    """Every ``*.yaml`` recipe under the folder ``root``, sorted.

    Raises:
        UsageError: ``root`` is missing or not a folder (an empty list would read as "no recipes").
    """
    why = not_a_folder(Path(root), "recipe folder")
    if why is not None:
        raise UsageError(f"{why}; «root» is the folder searched for *.yaml recipes")
    return sorted(Path(root).rglob("*.yaml"))


# Reading the values a recipe (or a flag) holds as text


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``224`` -> (3, 224, 224); ``1x28x28`` -> (1, 28, 28); None stays None."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError as exc:
        raise UsageError(f"«input-size» takes 224 or CxHxW like 3x32x32; got {text!r}") from exc
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    if len(parts) == 3 and min(parts) > 0:
        if max(parts[1:]) > MAX_SIDE or parts[0] > 64:
            raise UsageError(f"«input-size={text}» is out of range: at most 64 channels and {MAX_SIDE} px a side")
        return (parts[0], parts[1], parts[2])
    raise UsageError(f"«input-size» takes 224 or CxHxW like 3x32x32 (each >= 1); got {text!r}")


MAX_SIDE = 8192  # px: an example input of 3x8192x8192 is already 805 MB in fp32


def parse_rank(text: str | None, what: str) -> int | float | None:
    """``64`` -> 64 filters, ``0.25`` -> a quarter of C_out; raises UsageError naming ``what``."""
    from .core.banks import parse_value

    return None if text is None else parse_value(text, what)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def leaf_types(names: list[str]) -> list[type]:
    """The module classes named ``package.module.ClassName`` that fx must not trace into."""
    from torch import nn

    found = []
    for name in names:
        module, _, cls = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError, ValueError) as exc:
            raise UsageError(f"«leaf-module» {name!r} is not an importable class (package.module.ClassName)") from exc
        if not (isinstance(found[-1], type) and issubclass(found[-1], nn.Module)):
            raise UsageError(f"«leaf-module» {name!r} is a {type(found[-1]).__name__}, not an nn.Module class")
    return found
