"""One configuration schema: every option of convert/distill/train/bench is a recipe field."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from dacnn_convert.cli import app
from dacnn_convert.cli.common import ACTIONS
from dacnn_convert.errors import RecipeError
from dacnn_convert.recipes import Recipe, load_recipe

FIELDS = {f.name for f in dataclasses.fields(Recipe)}
RUNNER = CliRunner()


@pytest.mark.parametrize("command", ["convert", "distill", "train", "bench"])
def test_every_option_of_a_run_command_is_a_recipe_field_of_the_same_name(command: str) -> None:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    options = {p.name for p in click_command.params} - ACTIONS - {"ctx"}
    assert options - FIELDS == set(), f"{command} options a recipe cannot set"


def test_a_recipe_sets_a_size_target_and_flags_override_it(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tests.models:tiny_resnet\nweights: none\ninput_size: '16'\ntarget_params: 5K\n")
    # the recipe names user code: the command line names it too (a recipe alone never imports code)
    planned = RUNNER.invoke(app, ["convert", "tests.models:tiny_resnet", "--recipe", str(recipe), "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert "mode budget" in planned.output  # the recipe's target made it a budget search
    by_flag = RUNNER.invoke(
        app, ["convert", "tests.models:tiny_resnet", "--recipe", str(recipe), "--dry-run", "--target-params", "8K"]
    )
    assert by_flag.exit_code == 0, by_flag.output

    def after(output: str) -> int:
        return int(re.search(r"unique params [\d,]+ -> ([\d,]+)", output)[1].replace(",", ""))  # type: ignore[index]

    assert after(planned.output) <= 5_000 < after(by_flag.output) <= 8_000


def test_a_bench_recipe_runs_through_dacnn_bench(tmp_path) -> None:
    recipe = tmp_path / "b.yaml"
    recipe.write_text(
        "task: bench\nmodel: tests.models:tiny_resnet\ndataset: synthetic\ninput_size: '16'\nmethods: dacnn-mix\n"
        "epochs: 1\nlimit_batches: 2\nprecision: fp32\ncalib_batches: 1\nlatency_repeats: 1\n"
        f"out: {tmp_path / 'out'}\n"
    )
    done = RUNNER.invoke(app, ["bench", "tests.models:tiny_resnet", "--dataset", "synthetic", "--recipe", str(recipe)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "bench.json").is_file() and "dacnn-mix" in done.output


def test_recipe_types_and_ranges_are_checked_with_the_key_named(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet18\nchannels_last: 3\n")
    with pytest.raises(RecipeError, match="channels_last must be true or false, got 3"):
        load_recipe(bad)
    bad.write_text("task: bench\nbudget: 1.5\n")
    with pytest.raises(RecipeError, match=r"budget is a fraction .* in \(0, 1\)"):
        load_recipe(bad)
    assert Recipe(feature_loss="mse", feature_weight=0.5).train_config().feature_weight == 0.5
    assert Recipe(feature_weight=0.5).train_config().feature_weight == 0.0  # no feature loss asked


def test_distill_without_data_is_refused_instead_of_distilling_nothing() -> None:
    done = RUNNER.invoke(app, ["distill", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"])
    assert done.exit_code == 2 and "dacnn distill needs --dataset" in done.output


def test_a_conversion_job_is_one_library_call_returning_a_typed_result(tmp_path) -> None:
    from dacnn_convert.jobs import run_convert_job
    from dacnn_convert.train import make_loaders

    rec = Recipe(model="tests.models:tiny_resnet", weights="none", input_size="16", out=str(tmp_path / "a"))
    job = run_convert_job(rec)
    assert job.pipeline is None and job.report is not None and job.plan.init == "fit"  # no data: weight fit
    assert job.report.params_after == job.plan.params_after and (tmp_path / "a" / "model.safetensors") in job.files
    with_data = Recipe(
        model="tests.models:tiny_resnet",
        weights="none",
        input_size="16",
        dataset="synthetic",
        epochs=1,
        limit_batches=1,
        calib_batches=1,
        precision="fp32",
        target_ratio=1.5,
        out=str(tmp_path / "b"),
    )
    job = run_convert_job(with_data, loaders_for=lambda size, _: make_loaders("synthetic", 16, size[1]))
    assert job.search is not None and job.plan.init == "act" and job.pipeline is not None  # data: act fit, distilled
    assert job.pipeline.fit is not None and (tmp_path / "b" / "report.json").is_file()


def test_recipe_choices_and_keys_are_checked_at_load(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("dtype: fp64\n", "dtype must be one of fp32, fp16, bf16, int8, got 'fp64'"),
        ("feature_loss: MSE\n", "feature_loss must be one of none, mse"),
        ("mode: mixx\n", "Did you mean: mix"),
        ("1: 2\n", "keys are names like epochs, got 1 (int)"),
    ]:
        bad.write_text(text)
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(bad)


def test_recipe_run_refuses_a_bench_recipe_and_keeps_the_recipes_device(tmp_path) -> None:
    bench = tmp_path / "b.yaml"
    bench.write_text("task: bench\nmodel: tests.models:tiny_resnet\ndataset: synthetic\n")
    done = RUNNER.invoke(app, ["recipe", "run", str(bench)])
    assert done.exit_code == 2 and f"run it with `dacnn bench --recipe {bench}`" in done.output
    refused = RUNNER.invoke(app, ["convert", "--recipe", str(bench)])
    assert refused.exit_code == 2 and "dacnn bench --recipe" in refused.output


def test_the_seed_of_a_job_seeds_its_regulators_and_leaves_the_callers_rng_alone(tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from dacnn_convert.jobs import run_convert_job

    def regulator_weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        rec = Recipe(
            model="tests.models:tiny_resnet",
            weights="none",
            input_size="16",
            regulators="all",
            seed=seed,
            out=str(tmp_path / name),
        )
        run_convert_job(rec)
        return {k: v for k, v in load_file(str(tmp_path / name / "model.safetensors")).items() if "regulator" in k}

    before = torch.get_rng_state()
    a, again, other = regulator_weights(0, "a"), regulator_weights(0, "b"), regulator_weights(1, "c")
    assert torch.equal(before, torch.get_rng_state())  # the caller's random state is untouched
    assert a and all(torch.equal(a[k], again[k]) for k in a)  # same seed, same model
    assert any(not torch.equal(a[k], other[k]) for k in a)  # another seed, other random weights
