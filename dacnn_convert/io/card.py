"""Model cards and the Hugging Face hub folder layout: what a shipped model says about itself.

Every ``--out`` folder of a conversion gets a ``README.md`` in the hub's model-card style
(YAML front matter the hub indexes: library, tags, base model, datasets), with the plan,
the size, MACs, the accuracy after each step, the exact command and load snippets, with and
without this package. :func:`save_pretrained` / :func:`from_pretrained` read and write that
layout (``model.safetensors`` + ``README.md``) locally or on the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .. import validate
from ..atomic import atomic_write_text
from ..core.report import ConversionReport
from ..errors import CheckpointError, DacnnError, UsageError, first_line

WEIGHTS = "model.safetensors"
CARD = "README.md"


class HubError(DacnnError):
    """The hub cannot be reached or refused the request."""


def model_card(
    report: ConversionReport,
    command: str | None = None,
    accuracy: dict[str, float] | None = None,
    dataset: str | None = None,
    base_model: str | None = None,
    latency: tuple[float, float, int] | None = None,
) -> str:
    """A model card for a converted model: front matter, what was done, how big, how good, how to load.

    Args:
        report: the conversion report (plan, params, bytes, MACs).
        command: the command line that made it, recorded verbatim.
        accuracy: step name -> top-1 fraction (e.g. teacher, after conversion, after fine-tune).
        dataset: the dataset the accuracies were measured on.
        base_model: the hub id or name of the original model.
        latency: (original ms, this model's ms, batch) as measured for a latency target, on the machine
            that planned it.
    """
    base = base_model or report.source
    front = [
        "---",
        "library_name: dacnn-convert",
        "tags:",
        "- model-compression",
        "- weight-sharing",
        "- deep-anchored-cnn",
        "- safetensors",
        f"base_model: {base}",
    ]
    if dataset:
        front += ["datasets:", f"- {dataset}"]
    front.append("---")
    lines = [
        *front,
        "",
        f"# {report.source}, anchored ({report.mode})",
        "",
        f"A deep anchored version of `{base}` made with [dacnn-convert](https://pypi.org/project/dacnn-convert/): "
        "convolution kernels shared across layers (anchors, filter banks), every BatchNorm free.",
        "",
        "| | original | this model | ratio |",
        "|---|---:|---:|---:|",
        f"| unique parameters | {report.params_before:,} | {report.params_after:,} | {report.ratio:.2f}x |",
    ]
    if report.bytes_before and report.bytes_after:
        lines.append(
            f"| bytes on disk | {report.bytes_before:,} | {report.bytes_after:,} | {report.bytes_ratio:.2f}x |"
        )
    lines.append(
        f"| MACs at {'x'.join(map(str, report.input_size))} | {report.macs_before:,} | "
        f"{report.macs_after:,} | {report.macs_after / report.macs_before:.2f}x |"
    )
    if latency is not None:
        before, after, batch = latency
        lines.append(
            f"| latency, batch {batch} (fp32, measured when planned, on that machine) | {before:.3g} ms | "
            f"{after:.3g} ms | {before / after:.2f}x |"
        )
    if accuracy:
        lines += ["", f"Top-1 accuracy{f' on {dataset}' if dataset else ''}:", "", "| step | top-1 |", "|---|---:|"]
        lines += [f"| {step} | {100 * acc:.2f}% |" for step, acc in accuracy.items()]
    lines += [
        "",
        "## Plan",
        "",
        f"mode `{report.mode}`, init `{report.init}`, {report.regulators} regulators ({report.regulator_style})",
        "",
        "| anchor | sections | kernel | members |",
        "|---|---|---|---:|",
    ]
    lines += [f"| {g.anchor} | {','.join(map(str, g.sections))} | {g.kernel} | {g.members} |" for g in report.groups]
    if command:
        lines += ["", "## Made with", "", "```bash", command, "```"]
    lines += [
        "",
        "## Load",
        "",
        "With dacnn-convert (shared kernels stay shared):",
        "",
        "```python",
        "from dacnn_convert import from_pretrained",
        'model = from_pretrained("THIS_FOLDER_OR_HUB_ID").eval()',
        "```",
        "",
        "Without it: `dacnn export model.safetensors --format dense` writes the original "
        "architecture's state dict, which the original class loads with `strict=True`:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        'model.load_state_dict(load_file("model-fp32.dense.safetensors"))',
        "```",
        "",
        "ONNX Runtime: `dacnn export model.safetensors --format onnx`, then",
        "",
        "```python",
        "import onnxruntime as ort",
        'session = ort.InferenceSession("model-fp32.onnx")',
        'logits = session.run(None, {"input": images})[0]',
        "```",
    ]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def save_pretrained(
    model: nn.Module, folder: str | Path, card: str | None = None, source: Any = None, push_to_hub: str | None = None
) -> Path:
    """Write ``model`` in the hub's folder layout: ``model.safetensors`` (+ ``README.md``); optionally push it.

    Args:
        model: an anchored (or any) model; its plan travels in the file's metadata.
        folder: the local folder (created).
        card: the model card text (:func:`model_card`); None keeps an existing README.md.
        source: the model source recorded in the file (see :func:`dacnn_convert.save`).
        push_to_hub: a repo id (``user/name``) to upload the folder to.

    Raises:
        HubError: pushing failed (offline, no token, no such repo); the local folder is written first.
    """
    from .checkpoint import save

    out = validate.output_folder("folder", folder)
    if out is None:
        raise UsageError("«folder» is where model.safetensors and README.md go; got None")
    save(model, out / WEIGHTS, source=source)
    if card is not None:
        atomic_write_text(out / CARD, card)
    if push_to_hub is not None:
        from .sources import hub_reachable

        if not hub_reachable():
            raise HubError(
                f"the Hugging Face hub is unreachable (offline?): {out} was written but not pushed to "
                f"{push_to_hub}; push it later with huggingface_hub.upload_folder"
            )
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(out))
        except Exception as exc:  # auth, permissions, network: one line
            raise HubError(f"pushing {out} to {push_to_hub} failed: {first_line(exc, 200)}") from exc
    return out


def from_pretrained(name: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`: a local folder, a file, or a hub repo id.

    Args:
        name: a folder holding ``model.safetensors``, the file itself, or a hub id (``user/name``).
        model: the original skeleton, needed for user code (see :func:`dacnn_convert.load`).

    Raises:
        CheckpointError: the folder or file holds no model.
        HubError: a hub id while the hub is unreachable (cached downloads are used when present).
    """
    from .checkpoint import load

    path = Path(name)
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path} holds no {WEIGHTS}: was it written by save_pretrained?")
        return load(path / WEIGHTS, model)
    if path.is_file():
        return load(path, model)
    if str(name).count("/") != 1 or str(name).startswith((".", "/")):
        raise CheckpointError(f"{name!r} is neither a folder, a file, nor a hub id like user/name")
    from .sources import hub_reachable

    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(str(name), WEIGHTS, local_files_only=not hub_reachable())
    except Exception as exc:
        raise HubError(
            f"cannot fetch {name} from the Hugging Face hub (offline, or no such repo): {first_line(exc, 160)}"
        ) from exc
    return load(local, model)
