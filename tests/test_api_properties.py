"""The public API's invariant, drawn by hypothesis (issue 23): any argument of any type gives a result
or one typed DacnnError, never another exception; the model given comes back unchanged."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dacnn_convert as d
from dacnn_convert.errors import DacnnError

from .models import TinyResNet

SIZE = (3, 16, 16)
_BATCH = torch.randn(2, *SIZE)
_LABELS = torch.zeros(2, dtype=torch.long)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["mix", "all", "1,3", "5K", "fp8", "bank", "0.5,0.25", "none", "3x16x16"]),
    st.lists(st.integers(-1, 4), max_size=4),
    st.tuples(st.integers(0, 4), st.integers(0, 20), st.integers(0, 20)),
    st.dictionaries(st.sampled_from(["1", 1, 2]), st.floats(0, 2), max_size=2),
)
loaders = st.sampled_from(
    [
        [],
        [(_BATCH, _LABELS)],
        [_BATCH],
        [{"x": _BATCH}],
        [(_BATCH, _LABELS, _LABELS)],
        [(torch.randn(2, 1, *SIZE[1:]), _LABELS)],
        "not a loader",
        None,
        # session 8's adversarial pass
        [(torch.randint(0, 255, (2, *SIZE), dtype=torch.uint8), _LABELS)],
        [(torch.full((2, *SIZE), float("nan")), _LABELS)],
    ]
)
labelled_loaders = st.sampled_from(  # what a training or evaluation loader may wrongly yield
    [
        [(_BATCH, torch.rand(2))],  # float labels
        [(_BATCH, torch.eye(10)[:2])],  # one-hot
        [(_BATCH, torch.full((2,), 50))],  # beyond the head
        [(_BATCH, torch.full((2,), -1))],
        [(_BATCH, torch.zeros(3, dtype=torch.long))],  # one label too many
        [(_BATCH, torch.zeros(2, dtype=torch.bool))],
        [(torch.randint(0, 255, (2, *SIZE), dtype=torch.uint8), _LABELS)],
        [(torch.full((2, *SIZE), float("inf")), _LABELS)],
        [(_BATCH, _LABELS)],  # fine
    ]
)
KEYWORDS = [
    "mode",
    "regulators",
    "input_size",
    "target_params",
    "target_ratio",
    "bank_size",
    "calib_batches",
    "score_batches",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    verb=st.sampled_from(["plan", "anchor"]),
    key=st.sampled_from(KEYWORDS),
    value=junk,
    loader=loaders,
)
def test_plan_and_anchor_take_anything_and_answer_with_a_result_or_a_typed_error(verb, key, value, loader) -> None:
    model = TinyResNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if verb == "plan" and key == "calib_batches":  # plan()'s 0.1.0 name for score_batches (deprecated)
        key = "score_batches"
    kwargs = {"input_size": SIZE, key: value}
    if loader is not None:
        kwargs["calib_loader"] = loader
    try:
        getattr(d, verb)(model, **kwargs)
    except DacnnError:
        pass
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=25, deadline=None)
@given(what=st.sampled_from(["convert", "save", "count_params", "TrainConfig", "distill"]), value=junk)
def test_other_verbs_refuse_wrong_types_with_typed_errors(tmp_path_factory, what, value) -> None:
    out = tmp_path_factory.mktemp("api") / "m.safetensors"
    calls = {
        "convert": lambda: d.convert(TinyResNet(), value),
        "save": lambda: d.save(TinyResNet(), out, dtype=value),
        "count_params": lambda: d.count_params(value),
        "TrainConfig": lambda: d.TrainConfig(epochs=value),
        "distill": lambda: d.distill(TinyResNet(), value, [(_BATCH, _LABELS)], [(_BATCH, _LABELS)], epochs=1),
    }
    try:
        calls[what]()
    except DacnnError:
        pass


@settings(max_examples=30, deadline=None)
@given(
    verb=st.sampled_from(["evaluate", "distill", "compress"]),
    train=labelled_loaders,
    val=labelled_loaders,
    out=st.sampled_from([None, "folder-as-str", "a-file", 3]),
)
def test_training_and_evaluation_take_odd_batches_with_a_result_or_a_typed_error(
    tmp_path_factory, verb, train, val, out
) -> None:
    """Session 8: float, one-hot, out-of-range labels and uint8/inf images crashed or scored 0 silently."""
    from dacnn_convert.train.evaluation import evaluate

    tmp = tmp_path_factory.mktemp("api")
    (tmp / "a-file").write_text("keep")
    folder = {None: None, "folder-as-str": str(tmp / "run"), "a-file": tmp / "a-file", 3: 3}[out]
    config = d.TrainConfig.finetune(precision="fp32")
    calls = {
        "evaluate": lambda: evaluate(TinyResNet(), val),
        "distill": lambda: d.distill(TinyResNet(), TinyResNet(), train, val, epochs=1, config=config, out=folder),
        "compress": lambda: d.compress(
            TinyResNet(), train, val, mode="mix", epochs=1, calib_batches=1, train=config, out=folder
        ),
    }
    try:
        calls[verb]()
    except DacnnError:
        pass
    assert (tmp / "a-file").read_text() == "keep"
