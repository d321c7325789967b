"""What every command shares: consoles, choices, flag types, data options, progress, errors.

A thin typer layer: parse flags, call the library, render its result objects with
rich. Library errors become one line on stderr and exit code 1 (usage errors 2).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from ..defaults import DEFAULT_INPUT_SIZE
from ..errors import DacnnError, UsageError, first_line

# markup off: paths, model names and metadata are printed as given ("model[v2].safetensors" is a
# file name, not a style tag; "[/]" in one crashed rich); styles are set with rich.text.Text instead
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

# flags renamed since 0.1.0, still accepted for one release (the options list both names)
RENAMED_FLAGS = {"--calibrate-batches": "--calib-batches"}

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout instead of tables")]


def print_json(document: Any) -> None:
    """``--json``: the document alone on stdout (no colour, no wrapping), for scripts and jq."""
    import json

    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def labelled(label: str, style: str, text: str) -> Text:
    """``label`` styled, then ``text`` printed as it is (control characters from a file removed)."""
    clean = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)
    return Text.assemble((label, style), " ", clean)


def load_checkpoint(path: Path, model: str | None = None) -> Any:
    """Load a dacnn checkpoint; ``model`` (a source given on the command line) builds the skeleton.

    Sources written in a file are never imported; user code must be named by the user.
    """
    import json

    from ..io.checkpoint import load, read_metadata
    from ..io.sources import build_model, parse_spec

    meta = read_metadata(path)
    try:
        recorded = json.loads(meta["source"]) if "source" in meta else None
    except (json.JSONDecodeError, RecursionError):
        recorded = None  # load() names the malformed metadata
    if model is None:
        if isinstance(recorded, dict) and recorded.get("kind") == "module":
            raise UsageError(
                f"{path} comes from user code, which is never imported from a file: name it with "
                f"--model {recorded.get('name')}"
            )
        return load(path)
    classes = recorded.get("num_classes") if isinstance(recorded, dict) else None
    return load(path, model=build_model(parse_spec(model, classes), weights=None))


def source_of(model: Any, given: str | None = None) -> Any:
    """The model source of a loaded checkpoint: ``--model`` if given, else the one its file records."""
    from ..io.checkpoint import SOURCE_ATTR
    from ..io.sources import parse_spec

    recorded = getattr(model, SOURCE_ATTR, None)
    if given is None:
        return recorded
    return parse_spec(given, recorded.num_classes if recorded is not None else None)


# options that act on one invocation rather than describe the run: not recipe fields
ACTIONS = frozenset({"recipe", "dry_run", "resume", "overwrite", "explain"})


def recipe_from_command(ctx: typer.Context, task: str, path: Path | None = None) -> Any:
    """The resolved :class:`~dacnn_convert.recipes.Recipe` of a command: the recipe file's values
    (if ``path``), overridden by every flag given on the command line; where neither says, the
    command's own default. Flags are recipe fields of the same name (the one mapping).

    Raises:
        RecipeError: the file is unreadable or invalid; UsageError: a recipe of another task.
    """
    import warnings

    from ..recipes import Recipe, check_recipe_code, load_recipe

    with warnings.catch_warnings(record=True) as heard:  # a renamed recipe key: say so, as a note
        warnings.simplefilter("always", DeprecationWarning)
        rec = load_recipe(path) if path is not None else Recipe(task=task)
    for w in heard:
        if issubclass(w.category, DeprecationWarning):
            err_console.print(f"note: {w.message}", highlight=False, soft_wrap=True)
    for old, new in RENAMED_FLAGS.items():  # typer hands the value over under the new name, silently
        if any(arg == old or arg.startswith(old + "=") for arg in sys.argv[1:]):
            err_console.print(f"note: {old} is deprecated and goes in the next release: write {new}", highlight=False)
    if rec.task != task:
        how = f"dacnn bench --recipe {path}" if rec.task == "bench" else f"dacnn recipe run {path}"
        raise UsageError(f"{path} is a {rec.task!r} recipe: run it with `{how}`")
    # by name: typer vendors its own click, whose ParameterSource is not click's
    given = {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    if path is not None:  # before anything is built: a recipe alone never imports code
        check_recipe_code(
            rec, path, ctx.params.get("model") if "model" in given else None, leaf_named="leaf_module" in given
        )
    fields = set(vars(rec))
    changes: dict[str, Any] = {}
    for key, value in ctx.params.items():
        if key in ACTIONS or key not in fields or (path is not None and key not in given):
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list | tuple):  # a repeatable flag (--leaf-module): comma-separated in a recipe
            value = ",".join(value) or None
        changes[key] = value
    return rec.override(**changes)


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation the machine cannot make: MemoryError, or torch's (CPU or CUDA) out-of-memory error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def handled(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with the CLI's one error rule: a library error, or an allocation the machine cannot
    make (a 10^12-class head, a 3x4096x4096 batch of 64), is one line and an exit code, never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DacnnError as exc:
            raise fail(exc) from None
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            import re

            asked = re.search(r"allocate (\d+) bytes", str(exc))
            what = f"one tensor needed {int(asked[1]):,} bytes" if asked else first_line(exc, 160)
            raise fail(
                DacnnError(
                    f"out of memory: {what}; a smaller «batch-size», «input-size», class count or model needs less"
                )
            ) from None

    return run


def fail(exc: DacnnError) -> typer.Exit:
    """Print a library error as one line and return the exit to raise."""
    err_console.print(labelled("error:", "bold red", exc.cli_message()), highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


@dataclass(frozen=True)
class DataOptions:
    """The data side of a command: its resolved recipe (every data and fine-tuning setting, the one
    schema) and what the run decides (``resume``, ``overwrite``). Nothing is copied out of the recipe:
    a new training flag is a recipe field and a :meth:`Recipe.train_config` entry, nothing here."""

    rec: Any  # recipes.Recipe
    resume: bool = False
    overwrite: bool = False

    @classmethod
    def from_recipe(cls, rec: Any, resume: bool = False, overwrite: bool = False) -> DataOptions:
        return cls(rec, resume, overwrite)

    @classmethod
    def of(cls, dataset: str, resume: bool = False, overwrite: bool = False, **settings: Any) -> DataOptions:
        """Options for ``dataset`` with recipe ``settings`` (``device="cpu"``, ``epochs=3``, ...); CLI
        choices may arrive as Enums."""
        from ..recipes import Recipe

        plain = {k: v.value if isinstance(v, Enum) else v for k, v in settings.items()}
        return cls(Recipe(dataset=dataset, **plain), resume, overwrite)

    @property
    def dataset(self) -> str | None:
        return self.rec.dataset

    @property
    def plot(self) -> bool:
        return bool(self.rec.plot)

    @property
    def seed(self) -> int:
        return int(self.rec.seed)

    def config(self) -> Any:
        """The training settings (:meth:`Recipe.train_config`); a command checkpoints on Ctrl-C / SIGTERM."""
        return self.rec.train_config(catch_signals=True)

    def torch_device(self) -> Any:
        """The resolved ``--device`` (see :func:`dacnn_convert.train.device.resolve_device`).

        A CUDA device also becomes the current one: the CLI owns its process, and autocast,
        pinned-memory copies and bf16 support checks then all speak of that GPU.
        """
        import torch

        from ..train.device import resolve_device

        device = resolve_device(self.rec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def input_size(
        self, given: tuple[int, int, int] | None, model_default: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    ) -> tuple[int, int, int]:
        """``--input-size`` if given, else 32 px for the registered datasets, else the model's own size."""
        from ..train.data import native_size

        if given is not None:
            return given
        side = native_size(self.dataset) if self.dataset else None
        return (model_default[0], side, side) if side else model_default

    def loaders(self, size: tuple[int, int, int], image: Any = None) -> Any:
        """Train/val loaders at ``size``; ``image``: the model's preprocessing for imagefolder data."""
        from ..train import make_loaders
        from ..train.distributed import init_from_env

        assert self.dataset is not None
        device = self.torch_device()
        rank, world = init_from_env(device)  # under torchrun: this process's GPU first, then the group
        if rank != 0:
            console.quiet = True  # rank 0 alone reports
        rec = self.rec
        return make_loaders(
            self.dataset,
            rec.batch_size,
            size[1],
            size[0],
            download=rec.download,
            train_limit=rec.train_limit,
            seed=rec.seed,
            rank=rank,
            world_size=world,
            augment=rec.augment,
            pin_memory=device.type == "cuda",
            image=image,
        )


class _Progress:
    """Renders the library's progress callbacks with a rich progress bar."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None
        self.epoch = 0

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def step(self, s: dict[str, float]) -> None:
        if self.task is None or s["epoch"] != self.epoch:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.epoch = int(s["epoch"])
            self.task = self.bar.add_task(f"epoch {self.epoch}", total=s["steps"], info="")
        info = f"loss {s['loss']:.3f} acc {100 * s['acc']:.1f}% {s['images_per_s']:.0f} img/s"
        self.bar.update(self.task, completed=s["step"], info=info)

    def epoch_end(self, row: dict[str, float]) -> None:
        console.print(
            f"epoch {row['epoch']:.0f}: train loss {row['train_loss']:.3f}, train acc {100 * row['train_acc']:.2f}%, "
            f"val acc {100 * row['val_acc']:.2f}% ({row['wall_s']:.0f} s)"
        )

    def stage(self, name: str, acc: float) -> None:
        console.print(f"accuracy {name}: {100 * acc:.2f}%")
