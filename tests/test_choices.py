"""Every named choice has one source (dacnn_convert.names): the library's checks, the recipes, the
CLI's choices and the API's Literal types all take exactly its values (issue 24)."""

from __future__ import annotations

import typing

import pytest

from dacnn_convert import names
from dacnn_convert.cli import options
from dacnn_convert.recipes import choices

CLI = {
    "MODES": options.Mode,
    "INITS": options.Init,
    "REGULATOR_STYLES": options.RegulatorStyle,
    "REGULATOR_INITS": options.RegulatorInit,
    "METRICS": options.Metric,
    "OPTIMIZERS": options.Optimizer,
    "SCHEDULES": options.Schedule,
    "PRECISIONS": options.Precision,
    "AUGMENTS": options.Augment,
    "FEATURE_LOSSES": options.FeatureLoss,
    "STORAGE_DTYPES": options.Dtype,
    "EXPORT_FORMATS": options.ExportFormat,
    "PRUNE_IMPORTANCES": options.PruneImportance,
}


@pytest.mark.parametrize("name", sorted(CLI))
def test_the_cli_offers_exactly_the_librarys_values(name) -> None:
    assert {m.value for m in CLI[name]} == set(getattr(names, name))


def test_recipes_check_against_the_same_lists() -> None:
    table = choices()
    for field, const in [
        ("mode", "MODES"),
        ("init", "INITS"),
        ("regulator_style", "REGULATOR_STYLES"),
        ("regulator_init", "REGULATOR_INITS"),
        ("metric", "METRICS"),
        ("optimizer", "OPTIMIZERS"),
        ("schedule", "SCHEDULES"),
        ("precision", "PRECISIONS"),
        ("augment", "AUGMENTS"),
        ("feature_loss", "FEATURE_LOSSES"),
        ("dtype", "STORAGE_DTYPES"),
        ("prune_importance", "PRUNE_IMPORTANCES"),
    ]:
        assert set(table[field]) == set(getattr(names, const)), field


def test_the_library_registries_and_literals_agree() -> None:
    from dacnn_convert.core import planning
    from dacnn_convert.io import checkpoint

    assert set(planning.MODES) == set(names.MODES)  # one grouping policy per mode name
    assert set(typing.get_args(planning.ModeName)) == set(names.MODES)
    assert set(typing.get_args(planning.InitName)) == {*names.INITS, "none"}  # "none": keep the loaded weights
    assert set(typing.get_args(planning.RegulatorStyleName)) == set(names.REGULATOR_STYLES)
    assert set(checkpoint.STORAGE_DTYPES) == set(names.STORAGE_DTYPES)
