"""Typed configuration of the RLVR objectives and the papers' presets (docs/numerics.md §§ 2 to 5).

Every config is a frozen dataclass validated at construction; a bad value raises ValueError naming
the field and, for choices, the allowed values. ``config_from_dict`` builds an ``AlgorithmConfig``
from plain (YAML-loaded) dicts, optionally on top of a preset, and names nested fields by their
path, e.g. ``selection.forking.rho``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import get_type_hints

from megatron_archer.config_fields import (
    boolean,
    choice,
    from_dict,
    instance,
    integer,
    merge,
    number,
    to_plain,
)

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
SELECTION_METHODS = ("none", "forking", "archer", "archer_soft", "clip_cov", "kl_cov")
COVARIANCE_METHODS = ("clip_cov", "kl_cov")
ENTROPY_SOURCES = ("current", "old")
FORKING_SCOPES = ("global", "micro_batch")
FORKING_NORMALIZERS = ("all", "selected")
FORKING_KEEP = ("top", "bottom")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_AGGREGATIONS = ("token", "class_mean")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
CORRECTION_LEVELS = ("token", "sequence")
CORRECTION_MODES = ("truncate", "mask")
SEQUENCE_RATIOS = ("geometric_mean", "product")
MASK_NORMALIZERS = ("keep", "drop")
OLD_LOGPROBS = ("recompute", "rollout")


@dataclass(frozen=True)
class Constraints:
    """Clip range ``clip(r, 1 - eps_low, 1 + eps_high)`` and KL coefficient for one token class
    (docs/numerics.md §3, §5)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0

    def __post_init__(self):
        number("eps_low", self.eps_low, low=0.0, high=1.0, high_open=True)
        number("eps_high", self.eps_high, low=0.0)
        number("kl_coef", self.kl_coef, low=0.0)


@dataclass(frozen=True)
class AdvantageConfig:
    """Group-relative advantage estimator (docs/numerics.md §2); ``std_eps`` guards GRPO's division by the std."""

    estimator: str = "grpo"
    std_eps: float = 1e-6

    def __post_init__(self):
        choice("estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        number("std_eps", self.std_eps, low=0.0, low_open=True)


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop all-equal-reward groups, regenerate at most ``max_gen_rounds`` times."""

    enabled: bool = False
    max_gen_rounds: int = 10

    def __post_init__(self):
        boolean("enabled", self.enabled)
        integer("max_gen_rounds", self.max_gen_rounds, low=1)


@dataclass(frozen=True)
class OverlongConfig:
    """DAPO overlong reward shaping with L_max = ``max_length`` and L_c = ``cache_length`` (docs/numerics.md §2)."""

    enabled: bool = False
    max_length: int = 20480
    cache_length: int = 4096

    def __post_init__(self):
        boolean("enabled", self.enabled)
        integer("max_length", self.max_length, low=1)
        integer("cache_length", self.cache_length, low=1)
        if self.cache_length > self.max_length:
            raise ValueError(
                f"cache_length must be <= max_length ({self.max_length}); got {self.cache_length}"
            )


@dataclass(frozen=True)
class ForkingConfig:
    """Forking tokens (docs/numerics.md §4): only the top-``rho`` entropy tokens carry policy gradient.

    ``scope``: ``global`` = threshold over the whole optimiser step on all data-parallel ranks (the
    paper's formula); ``micro_batch`` = top-k per micro-batch, k = ceil(rho n) (the authors' code).
    ``normalizer``: divide the policy-gradient sum by ``all`` valid tokens (the paper) or by the
    ``selected`` tokens (the authors' code). ``keep="bottom"`` is the paper's "bottom 1 - rho only"
    ablation: the complement of the top-rho tokens carries the gradient instead.

    Threshold source with ``scope: global``: the threshold is the top-rho level of the *old*
    policy's entropy over the update's tokens (known before the update's forward); with
    ``selection.entropy_source: current`` each token's current entropy is compared to it, so the
    share selected is about rho at the first update of a step and drifts as the policy moves
    (the trainer logs ``actor/high/token_share_update_min`` / ``_max``). ``entropy_source: old``
    selects exactly rho of the tokens at every update.
    """

    rho: float = 0.2
    scope: str = "global"
    normalizer: str = "all"
    keep: str = "top"

    def __post_init__(self):
        number("rho", self.rho, low=0.0, high=1.0, low_open=True)
        choice("scope", self.scope, FORKING_SCOPES)
        choice("normalizer", self.normalizer, FORKING_NORMALIZERS)
        choice("keep", self.keep, FORKING_KEEP)


@dataclass(frozen=True)
class ArcherConfig:
    """Archer dual-token constraints (docs/numerics.md §5).

    Tokens above the per-response ``quantile`` of entropy are "reasoning" tokens, the rest
    "knowledge" tokens; each class gets its own clip range and KL coefficient. ``soft_width`` is
    used by ``archer_soft`` only: the width, in response-level entropy rank, of the linear ramp
    centred on ``quantile`` that moves a token from the knowledge to the reasoning constraints.
    """

    quantile: float = 0.8
    reasoning: Constraints = field(default_factory=lambda: Constraints(0.5, 0.5, 0.0))
    knowledge: Constraints = field(default_factory=lambda: Constraints(0.2, 0.2, 0.001))
    soft_width: float = 0.2

    def __post_init__(self):
        number("quantile", self.quantile, low=0.0, high=1.0)
        instance("reasoning", self.reasoning, Constraints)
        instance("knowledge", self.knowledge, Constraints)
        number("soft_width", self.soft_width, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class ClipCovConfig:
    """Clip-Cov (docs/numerics.md §10): of the tokens whose centred covariance between log-prob
    and advantage lies in [``lb``, ``ub``], max(1, floor(``ratio`` N)) drawn at random (N: the
    step's tokens) carry no policy gradient. Defaults: the paper's and its authors' code."""

    ratio: float = 2e-4
    lb: float = 1.0
    ub: float = 5.0

    def __post_init__(self):
        number("ratio", self.ratio, low=0.0, high=1.0, low_open=True)
        number("lb", self.lb, low=-float("inf"))
        number("ub", self.ub, low=-float("inf"))
        if self.ub < self.lb:
            raise ValueError(f"ub must be >= lb ({self.lb}); got {self.ub}")


@dataclass(frozen=True)
class KLCovConfig:
    """KL-Cov (docs/numerics.md §10): the max(1, floor(``ratio`` N)) tokens of the step with the
    largest centred covariance between log-prob and advantage get ``coef`` * |logp - logp_old|
    added to their loss. Defaults: the paper's (its Qwen2.5-7B runs) and its authors' code."""

    ratio: float = 2e-3
    coef: float = 1.0

    def __post_init__(self):
        number("ratio", self.ratio, low=0.0, high=1.0, low_open=True)
        number("coef", self.coef, low=0.0)


@dataclass(frozen=True)
class SelectionConfig:
    """Which tokens carry policy gradient and under which constraints (docs/numerics.md §4, 5).

    ``method``: ``none`` (every token, ``LossConfig.clip``), ``forking`` (see ForkingConfig),
    ``archer`` and ``archer_soft`` (see ArcherConfig; their per-class constraints replace
    ``LossConfig.clip``), ``clip_cov`` and ``kl_cov`` (see ClipCovConfig, KLCovConfig; they select
    by covariance, not entropy, and keep ``LossConfig.clip``). ``entropy_source`` tells the trainer
    which detached entropy to select with: the ``current`` policy's from the training forward
    (both papers' code) or the ``old`` policy's, computed once per batch.
    """

    method: str = "none"
    entropy_source: str = "current"
    forking: ForkingConfig = field(default_factory=ForkingConfig)
    archer: ArcherConfig = field(default_factory=ArcherConfig)
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    kl_cov: KLCovConfig = field(default_factory=KLCovConfig)

    def __post_init__(self):
        choice("method", self.method, SELECTION_METHODS)
        choice("entropy_source", self.entropy_source, ENTROPY_SOURCES)
        instance("forking", self.forking, ForkingConfig)
        instance("archer", self.archer, ArcherConfig)
        instance("clip_cov", self.clip_cov, ClipCovConfig)
        instance("kl_cov", self.kl_cov, KLCovConfig)

    @property
    def uses_entropy(self) -> bool:
        """The method selects by entropy (every one but ``none`` and the covariance methods)."""
        return self.method not in ("none", *COVARIANCE_METHODS)


@dataclass(frozen=True)
class LossConfig:
    """Clipped policy loss, KL, entropy bonus and aggregation (docs/numerics.md §3).

    ``clip`` holds the clip range and KL coefficient of every token when the selection method has
    no token classes of its own (``none``, ``forking``). ``dual_clip`` is c > 1 or None.
    ``kl_aggregation``: ``token`` puts beta_t * KL_t in the same aggregation as the policy loss;
    ``class_mean`` (Archer's code) averages KL within each token class over that class's token
    count in the step, then weights by the class coefficient. ``norm_length`` is the constant
    divisor of ``seq-mean-token-sum-norm`` (Dr.GRPO), usually the maximum response length.
    """

    clip: Constraints = field(default_factory=Constraints)
    dual_clip: float | None = None
    kl_estimator: str = "k3"
    kl_aggregation: str = "token"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    norm_length: int | None = None

    def __post_init__(self):
        instance("clip", self.clip, Constraints)
        if self.dual_clip is not None:
            number("dual_clip", self.dual_clip, low=1.0, low_open=True)
        choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        choice("kl_aggregation", self.kl_aggregation, KL_AGGREGATIONS)
        number("entropy_coef", self.entropy_coef, low=0.0)
        choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.aggregation == "seq-mean-token-sum-norm":
            integer("norm_length", self.norm_length, low=1)
        elif self.norm_length is not None:
            raise ValueError("norm_length is only used by aggregation 'seq-mean-token-sum-norm'")


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Train-inference mismatch correction (docs/numerics.md §8), off unless ``enabled``.

    Importance weights w = pi_old / pi_rollout from the engine's log-probs, per token
    (``level="token"``) or per response (``level="sequence"``: the ``geometric_mean`` of its token
    ratios, or their ``product`` with the log clamped to [-20, 20]). ``mode="truncate"``
    multiplies each policy term by min(w, C), detached (the gradient flows through the policy ratio
    only); ``mode="mask"`` gives weight 0 to tokens (or whole responses) with w outside
    [1/C, C]. C is ``threshold``. ``mask_normalizer``: masked tokens ``keep`` their place in every
    loss normaliser (docs/numerics.md §8's default: the normalisers stay those of the sampled batch), or
    ``drop`` out of the step entirely (policy term, KL, entropy bonus, token and response counts,
    forking threshold and Archer quantiles: as if never sampled). Token-level truncation at C = 2
    is the recommended setting.
    """

    enabled: bool = False
    level: str = "token"
    mode: str = "truncate"
    threshold: float = 2.0
    sequence_ratio: str = "geometric_mean"
    mask_normalizer: str = "keep"

    def __post_init__(self):
        boolean("enabled", self.enabled)
        choice("level", self.level, CORRECTION_LEVELS)
        choice("mode", self.mode, CORRECTION_MODES)
        number("threshold", self.threshold, low=1.0, low_open=True)
        choice("sequence_ratio", self.sequence_ratio, SEQUENCE_RATIOS)
        choice("mask_normalizer", self.mask_normalizer, MASK_NORMALIZERS)
        if self.mask_normalizer == "drop" and self.mode != "mask":
            raise ValueError("mask_normalizer 'drop' needs mode 'mask' (truncation keeps every token)")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Everything the objective needs: advantages, DAPO machinery, token selection, loss, and the
    off-policy handling of docs/numerics.md §8.

    ``old_logprobs``: ``recompute`` takes pi_old from a forward of the trainer's model before the
    updates; ``rollout`` uses the engine's log-probs as pi_old instead (the ratio then carries the
    train-inference mismatch, and ``rollout_correction`` would have w = 1, so it is refused).
    """

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    old_logprobs: str = "recompute"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            instance(f.name, getattr(self, f.name), get_type_hints(type(self))[f.name])
        choice("old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        if self.rollout_correction.enabled and self.old_logprobs == "rollout":
            raise ValueError(
                "rollout_correction.enabled has no effect with old_logprobs 'rollout' (pi_old is "
                "then pi_rollout, so w = 1); use old_logprobs 'recompute' or disable the correction"
            )
        _check_selection_fields_used(self.selection)
        if self.selection.method in ("archer", "archer_soft") and self.loss.clip != Constraints():
            raise ValueError(
                f"loss.clip is not used with selection.method {self.selection.method!r} (its "
                f"token classes have their own); set selection.archer.reasoning and "
                f"selection.archer.knowledge instead; got loss.clip {self.loss.clip}")
        forking = self.selection.method == "forking"
        if (forking and self.selection.forking.normalizer == "selected"
                and self.loss.aggregation == "seq-mean-token-sum-norm"):
            raise ValueError(
                "selection.forking.normalizer 'selected' has no effect with loss.aggregation "
                "'seq-mean-token-sum-norm' (it divides by a constant); use 'all'"
            )


def _check_selection_fields_used(selection: SelectionConfig) -> None:
    """A field the chosen method ignores is an error naming the method: an override such as
    ``selection.forking.rho=0.5`` under Archer would otherwise change nothing, silently."""
    method = selection.method
    if method != "forking" and selection.forking != ForkingConfig():
        raise ValueError(f"selection.forking is set but selection.method is {method!r}, which "
                         f"does not use it; set selection.method 'forking' (or the forking_80_20 "
                         f"preset) or drop the selection.forking overrides")
    if method not in ("archer", "archer_soft") and selection.archer != ArcherConfig():
        raise ValueError(f"selection.archer is set but selection.method is {method!r}, which "
                         f"does not use it; set selection.method 'archer' or 'archer_soft' or drop "
                         f"the selection.archer overrides")
    for name, default in (("clip_cov", ClipCovConfig()), ("kl_cov", KLCovConfig())):
        if method != name and getattr(selection, name) != default:
            raise ValueError(f"selection.{name} is set but selection.method is {method!r}, which "
                             f"does not use it; set selection.method {name!r} or drop the "
                             f"selection.{name} overrides")
    if method in COVARIANCE_METHODS and selection.entropy_source != "current":
        raise ValueError(f"selection.entropy_source is set but selection.method {method!r} does "
                         f"not select by entropy; drop the selection.entropy_source override")
    if method == "archer" and selection.archer.soft_width != ArcherConfig().soft_width:
        raise ValueError("selection.archer.soft_width is used by selection.method 'archer_soft' "
                         "only; selection.method is 'archer'")


def _dapo() -> AlgorithmConfig:
    """DAPO as run by the forking-token paper (docs/numerics.md §4): clip-higher, no KL, token-mean."""
    return AlgorithmConfig(
        advantage=AdvantageConfig("grpo"),
        dynamic_sampling=DynamicSamplingConfig(enabled=True),
        overlong=OverlongConfig(enabled=True, max_length=20480, cache_length=4096),
        selection=SelectionConfig("none"),
        loss=LossConfig(clip=Constraints(0.2, 0.28, 0.0), aggregation="token-mean"),
    )


def _grpo() -> AlgorithmConfig:
    """GRPO (DeepSeekMath): eps 0.2, k3 KL with beta 0.04, per-sequence mean of token means."""
    return AlgorithmConfig(
        advantage=AdvantageConfig("grpo"),
        loss=LossConfig(clip=Constraints(0.2, 0.2, 0.04), kl_estimator="k3",
                        aggregation="seq-mean-token-mean"),
    )


def _forking_80_20() -> AlgorithmConfig:
    """DAPO with policy gradient on the top 20% entropy tokens of the step (docs/numerics.md §4, paper eq. 6)."""
    dapo = _dapo()
    return dataclasses.replace(dapo, selection=SelectionConfig(
        "forking", entropy_source="current",
        forking=ForkingConfig(rho=0.2, scope="global", normalizer="all", keep="top"),
    ))


def _archer() -> AlgorithmConfig:
    """Archer (docs/numerics.md §5): per-response 0.8 quantile split, dual clip 10, class-mean k3 KL."""
    return AlgorithmConfig(
        advantage=AdvantageConfig("grpo"),
        dynamic_sampling=DynamicSamplingConfig(enabled=True),
        selection=SelectionConfig("archer", entropy_source="current", archer=ArcherConfig()),
        loss=LossConfig(dual_clip=10.0, kl_estimator="k3", kl_aggregation="class_mean",
                        aggregation="token-mean"),
    )


PRESETS = {"grpo": _grpo, "dapo": _dapo, "forking_80_20": _forking_80_20, "archer": _archer}


def preset(name: str) -> AlgorithmConfig:
    """The named preset (``grpo``, ``dapo``, ``forking_80_20``, ``archer``) with the papers' defaults."""
    choice("preset", name, tuple(PRESETS))
    return PRESETS[name]()


def config_from_dict(data: Mapping) -> AlgorithmConfig:
    """An AlgorithmConfig from plain dicts; an optional ``preset`` key names the base it overrides."""
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None:
        data = merge(to_plain(preset(name)), data)
    return from_dict(AlgorithmConfig, data)
