"""Every named choice of the library, in one torch-free place.

The library checks values against these tuples, the recipes refuse anything else at load, the CLI
builds its choices (and ``--help``) from them without importing torch, and the ``Literal`` types of
the API spell the same values (``tests/test_choices.py`` checks that all of them agree). A new mode,
init or optimiser is added here and where it is implemented, nowhere else.
"""

from __future__ import annotations

# what to share (core.planning.MODES holds one grouping policy per name; "bank" is mix's groups with banks)
MODES = ("mix", "plain", "bank", "sharesnet", "none")
# how anchors are fitted (core.convert); "none" keeps the weights the model has (conversions of a loaded file)
INITS = ("fit", "act", "act-seq", "mean", "first", "random")
REGULATOR_STYLES = ("adapter", "paper")
REGULATOR_INITS = ("zero", "fit")  # how adapter regulators start (Plan.regulator_init)
METRICS = ("fit", "kl")  # the budget planner's score
# how channel pruning (core.pruning) ranks channels: group L2 norm (DepGraph) or each filter's L1 norm
PRUNE_IMPORTANCES = ("group", "l1")
OPTIMIZERS = ("sgd", "adamw", "adagrad")
SCHEDULES = ("cosine", "step")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("auto", "flip", "none")  # auto: random flips as the paper, none for SVHN (digits)
FEATURE_LOSSES = ("none", "mse")
STORAGE_DTYPES = ("fp32", "fp16", "bf16", "int8")  # what save() writes; int8 is per-channel quantized
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors", "pt", "dense")
