"""What to share, as one object: :class:`AnchorConfig`, the config ``plan()``, ``anchor()`` and
``compress()`` take (as torchao's ``quantize_(model, config)``).

    from dacnn_convert import AnchorConfig, anchor
    student = anchor(model, AnchorConfig(mode="mix", regulators="all"), calib_loader=loader)
    student = anchor(model, mode="mix", regulators="all", calib_loader=loader)   # the same: keyword shorthands
    student = anchor(model, AnchorConfig(target_ratio=4), calib_loader=loader)  # the budget planner decides

The config holds the decisions about the network (mode, regulators, banks, low rank, the size target and
how the planner scores); the data (``calib_loader``, ``calib_batches``), the example input size and the
module types fx must not trace stay arguments of the call, since they describe the data and the model, not
the conversion. A config is frozen, checked when it is made, and round-trips through :meth:`to_dict` (the
recipes' YAML holds the same keys).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from . import amounts, validate
from .budget import METRICS
from .core.banks import check_value, parse_bank_size
from .core.plan import REGULATOR_INITS
from .core.planning import INITS, MODES, REGULATOR_STYLES
from .defaults import RESCORE_ROUNDS, SCORE_BATCHES
from .errors import UsageError, choose, deprecated, suggest
from .names import PRUNE_IMPORTANCES


@dataclass(frozen=True)
class AnchorConfig:
    """What to share and how small to get.

    Attributes:
        mode: ``mix`` (share per stage and configuration, the paper's mixed DACNN), ``plain`` (one
            network-wide sliced kernel), ``bank`` (k shared filters per group + a 1x1 per member),
            ``sharesnet`` or ``none``. Ignored when a size target is given.
        regulators: ``none``, ``all`` or 1-based section numbers (``"1,3"`` or ``(1, 3)``).
        regulator_style: ``adapter`` (parallel, function-preserving) or ``paper`` (in series).
        regulator_init: ``fit`` or ``zero``; None: :data:`dacnn_convert.defaults.REGULATOR_INIT`.
        init: how anchors are fitted (``fit``, ``act``, ``act-seq``, ``mean``, ``first``, ``random``);
            None: :func:`dacnn_convert.defaults.default_init` (``act``/``act-seq`` with data, ``fit`` without).
        bank_size: filters per bank for ``mode="bank"``: an integer, a fraction of C_out, or per section
            (``"1:1.0,2:0.5"`` or ``{1: 1.0, 2: 0.5}``).
        factorize_unshared: rank (integer or fraction of C_out) of a low-rank factorisation of every conv
            that shares with nothing; None keeps them dense.
        share: banks the user names, one per entry: comma-separated module names or shell patterns of convs or
            nn.Linears of one shape in one stage (``("layer1.0.conv2,layer1.1.conv2",)``, ``"stages.1.*.fc1"``; a
            text separates groups with ``;``), each a bank of ``bank_size`` filters; with ``mode="bank"`` beside
            the mode's banks, with ``mode="none"`` the only ones (:func:`dacnn_convert.core.planning.named_groups`).
        target_params, target_ratio, target_bytes: a size target (at most one): the budget planner then
            picks free / mix / plain / banks / low rank per section instead of ``mode``.
        target_macs: a compute target, alone or with a size target: multiply-accumulates per example
            (``40_000_000``, ``"40M"``) or how many times fewer (``"4x"``); exact, counted as
            :func:`dacnn_convert.count_macs` does at the plan's input size.
        target_latency: a latency target in milliseconds per batch of ``latency_batch`` on this machine
            (the model's device), alone or with the other targets: the planner's plan is built and timed
            (:func:`dacnn_convert.latency.measure_latency`, median of 20 runs) and its MAC budget
            tightened until the measured time fits; the figure is reported in the search result.
        latency_batch: the batch size ``target_latency`` is measured at.
        metric: the planner's score: ``kl`` (needs data; the default with data) or ``fit``.
        score_batches: calibration batches the planner scores candidates on
            (:data:`dacnn_convert.defaults.SCORE_BATCHES`).
        prune: structured channel pruning before anything is shared: a fraction of every layer's channels in
            (0, 1) (the logits layer's outputs kept; Torch-Pruning's dependency graph keeps residual additions
            consistent), or ``"auto"``: the planner tries :data:`dacnn_convert.prune_search.PRUNE_GRID` and keeps
            the ratio whose pruned-and-shared plan scores best (needs a target). Pruning removes MACs where
            banks do not; the plan records it and stays data (``load`` narrows the skeleton). None: no pruning.
        prune_importance: how channels are ranked: ``group`` (group L2 norm, DepGraph) or ``l1`` (each filter's L1).
        share_across: after a budget search, merge its banks across stages where one joint bank of fewer parameters
            fits the members (convs reading patches of one C_in x kh x kw, any C_out) at no larger error, spend the
            saving on more filters, and keep that plan where it scores better whole
            (:func:`dacnn_convert.budget.share_across`; listed under "across stages" in ``--explain``).
        rescore_rounds: rounds of joint re-scoring after the planner's additive search (kl only): the
            chosen plan is scored whole and with each section left out, each section's scores are
            rescaled by what it costs in that company, and the search runs again; the plan with the
            lowest whole-plan kl is kept. 0: the additive search alone
            (:data:`dacnn_convert.defaults.RESCORE_ROUNDS`).
    """

    mode: str = "mix"
    regulators: str | tuple[int, ...] | None = "none"
    regulator_style: str = "adapter"
    regulator_init: str | None = None
    init: str | None = None
    bank_size: Any = 0.5
    factorize_unshared: int | float | None = None
    share: tuple[str, ...] | str = ()  # a text is read as groups separated by ";"
    target_params: int | None = None
    target_ratio: float | None = None
    target_bytes: int | None = None
    target_macs: int | str | None = None
    target_latency: float | None = None
    latency_batch: int = 1
    metric: str | None = None
    score_batches: int = SCORE_BATCHES
    rescore_rounds: int = RESCORE_ROUNDS
    prune: float | str | None = None
    prune_importance: str = "group"
    share_across: bool = False

    def __post_init__(self) -> None:
        choose("mode", self.mode, MODES)
        regs = validate.regulators(self.regulators)  # a list becomes a tuple: the config stays hashable
        object.__setattr__(self, "regulators", regs if regs is None or isinstance(regs, str) else tuple(regs))
        choose("regulator style", self.regulator_style, REGULATOR_STYLES)
        if self.regulator_init is not None:
            choose("regulator init", self.regulator_init, REGULATOR_INITS)
        if self.init is not None:
            choose("init", self.init, INITS)
        bank = validate.bank_size(self.bank_size)
        if isinstance(bank, Mapping):  # frozen and hashable: a mapping is kept as its sorted items' text
            bank = ",".join(f"{k}:{v}" for k, v in sorted(bank.items()))
        object.__setattr__(self, "bank_size", bank)
        parse_bank_size(bank)  # a malformed per-section text is refused now, not at planning
        if self.factorize_unshared is not None:
            check_value(self.factorize_unshared, "«factorize-unshared» rank")
        object.__setattr__(self, "share", validate.share_groups(self.share))
        object.__setattr__(self, "target_params", validate.optional_size("target-params", self.target_params))
        object.__setattr__(self, "target_bytes", validate.optional_size("target-bytes", self.target_bytes))
        object.__setattr__(self, "target_ratio", validate.optional_number("target-ratio", self.target_ratio, 1.0))
        object.__setattr__(self, "target_macs", amounts.macs_target(self.target_macs))
        object.__setattr__(self, "target_latency", validate.optional_number("target-latency", self.target_latency))
        validate.integer("latency-batch", self.latency_batch, 1)
        given = [n for n in ("target_params", "target_ratio", "target_bytes") if getattr(self, n) is not None]
        if len(given) > 1:
            raise UsageError(
                f"give one size target, not {' and '.join('«' + n.replace('_', '-') + '»' for n in given)}"
            )
        if self.metric is not None:
            choose("metric", self.metric, METRICS)
        validate.integer("score-batches", self.score_batches, 1)
        validate.integer("rescore-rounds", self.rescore_rounds, 0)
        object.__setattr__(self, "prune", validate.prune_ratio(self.prune))
        choose("prune importance", self.prune_importance, PRUNE_IMPORTANCES)
        validate.flag("share-across", self.share_across)
        if self.share_across and not self.by_budget:
            raise UsageError(
                "«share-across» merges the banks a budget search chose: give a size, MAC or latency target "
                "(a plan by «mode» shares what the mode says)"
            )
        if self.share and self.by_budget:
            raise UsageError(
                "«share» names banks for a plan by «mode»: with a size, MAC or latency target the planner picks its "
                "own groups (leave out the target, or «share»)"
            )
        if self.share and self.mode not in ("bank", "none"):
            raise UsageError(
                f"«share» names banks: use it with «mode» bank (the mode's banks too) or none (only these), "
                f"not {self.mode}"
            )
        if self.prune == "auto" and not self.by_budget:
            raise UsageError(
                "«prune» auto searches the pruning ratio for a target: give a size, MAC or latency target, "
                "or a ratio such as «prune» 0.25"
            )

    @property
    def by_budget(self) -> bool:
        """A size, MAC or latency target is given: the budget planner decides, and ``mode`` is not used."""
        targets = (self.target_params, self.target_ratio, self.target_bytes, self.target_macs, self.target_latency)
        return any(t is not None for t in targets)

    @property
    def by_size(self) -> bool:
        """A size target (params, ratio or bytes) is given."""
        return any(t is not None for t in (self.target_params, self.target_ratio, self.target_bytes))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a recipe's keys); :meth:`from_dict` reads them back."""
        out = asdict(self)
        if isinstance(out["regulators"], tuple):
            out["regulators"] = list(out["regulators"])
        out["share"] = list(out["share"])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AnchorConfig:
        """A config from :meth:`to_dict`'s keys; an unknown key is refused with the nearest known one."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise UsageError(f"AnchorConfig has no setting {key!r}.{suggest(key, sorted(known))}")
        return cls(**dict(values))


FIELDS = tuple(f.name for f in fields(AnchorConfig))

# The positional parameters plan() and anchor() took before AnchorConfig (0.1.0), in order.
_LEGACY_PLAN = ("mode", "regulators", "regulator_style", "init", "input_size", "leaf_modules")
LEGACY_ANCHOR = (*_LEGACY_PLAN, "calib_loader", "calib_batches")


def resolve_config(
    fn: str,
    config: Any,
    legacy: tuple[Any, ...],
    shorthands: dict[str, Any],
    call: dict[str, Any],
    legacy_names: Sequence[str] = _LEGACY_PLAN,
    defaults: dict[str, Any] | None = None,
) -> AnchorConfig:
    """The config a public call runs with: ``config`` (an AnchorConfig, or None for the defaults) with the
    keyword ``shorthands`` (AnchorConfig's field names) applied on top.

    The 0.1.0 positional form (``plan(model, "mix", "all")``) still works for one release, with a
    DeprecationWarning; its positionals that are not settings (input size, leaf modules, data) replace
    the entries of ``call`` (the call's other arguments by name); one given by keyword as well (``call``'s
    value is not the object in ``defaults``) is refused.

    Raises:
        UsageError: ``config`` is not an AnchorConfig, an unknown keyword, a setting given twice.
    """
    defaults = defaults or {}
    if isinstance(config, str) or legacy:  # 0.1.0: fn(model, mode, regulators, ...)
        positional = (config, *legacy)
        if len(positional) > len(legacy_names):
            raise UsageError(
                f"{fn}() takes the model, an AnchorConfig and keywords; got {len(positional) + 1} positional arguments"
            )
        deprecated(
            f"{fn}(model, {', '.join(legacy_names[: len(positional)])}) by position",
            f"write {fn}(model, AnchorConfig(...)) or keywords ({fn}(model, mode='mix', regulators='all'))",
            stacklevel=4,
        )
        config = None
        for name, value in zip(legacy_names, positional, strict=False):
            if name in shorthands or (name in call and name in defaults and call[name] is not defaults[name]):
                raise UsageError(f"{fn}() got «{name.replace('_', '-')}» twice (by position and by keyword)")
            if name in FIELDS:
                shorthands[name] = value
            else:
                call[name] = value
    if config is not None and not isinstance(config, AnchorConfig):
        raise UsageError(
            f"{fn}()'s second argument is an AnchorConfig (from dacnn_convert import AnchorConfig), "
            f"got {type(config).__name__}"
        )
    unknown = sorted(set(shorthands) - set(FIELDS))
    if unknown:
        raise UsageError(
            f"{fn}() got unknown option(s) {', '.join(unknown)}.{suggest(unknown[0], FIELDS)} "
            f"Its settings are AnchorConfig's: {', '.join(FIELDS)}"
        )
    base = config or AnchorConfig()
    return replace(base, **shorthands) if shorthands else base
