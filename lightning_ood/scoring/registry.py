"""Scorers by name: ``build_scorer("fmls", percentile=60, clip=1.0)``.

Each name is a class plus preset hyperparameters; keyword arguments override the presets. The names cover the paper's
Table I/II baselines, its method (``fmls``), the Table III ablations and the Table IV combinations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_ood.errors import ConfigError, unknown_name
from lightning_ood.scoring.base import Scorer
from lightning_ood.scoring.dice import DICE
from lightning_ood.scoring.featurenorm import FeatureNorm
from lightning_ood.scoring.fmls import FMLS
from lightning_ood.scoring.line import LINE
from lightning_ood.scoring.mahalanobis import Mahalanobis
from lightning_ood.scoring.odin import ODIN
from lightning_ood.scoring.output import MSP, Energy, MaxLogit
from lightning_ood.scoring.shaping import BATS, ReAct


@dataclass(frozen=True)
class Entry:
    """A registered scorer: what it builds, with which presets, and where it stands in the paper."""

    build: type[Scorer] | Callable[..., Scorer]
    presets: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    paper_name: str | None = None  # the method's name in the paper's tables


def odin_on(base: type[Scorer], **base_presets: Any) -> Callable[..., ODIN]:
    """A factory for ODIN on top of ``base``: ODIN's own keyword arguments go to ODIN, the rest to the base."""
    odin_params = set(inspect.signature(ODIN).parameters) - {"base"}

    def build(**kwargs: Any) -> ODIN:
        odin_kwargs = {k: v for k, v in kwargs.items() if k in odin_params}
        base_kwargs = {**base_presets, **{k: v for k, v in kwargs.items() if k not in odin_params}}
        return ODIN(base=construct(base, base_kwargs), **odin_kwargs)

    build.accepted = odin_params | set(inspect.signature(base).parameters)  # type: ignore[attr-defined]
    return build


SCORERS: dict[str, Entry] = {
    # Baselines (Tables I, II)
    "msp": Entry(MSP, {}, "maximum softmax probability", "MSP"),
    "odin": Entry(ODIN, {}, "temperature scaling + input perturbation", "ODIN"),
    "mahalanobis": Entry(Mahalanobis, {}, "distance to the closest class mean, tied covariance", "Mahalanobis"),
    "energy": Entry(Energy, {}, "logsumexp of the logits", "Energy"),
    "bats": Entry(BATS, {}, "per-unit truncation to mean +- lam * std, energy", "BATS"),
    "dice": Entry(DICE, {}, "head sparsified by contribution, energy", "DICE"),
    "react": Entry(ReAct, {}, "features clipped at the 90th percentile, energy", "ReAct"),
    "dice_react": Entry(DICE, {"clip_percentile": 90.0}, "ReAct clipping, then DICE", "DICE+ReAct"),
    "line": Entry(LINE, {}, "Shapley-based unit and weight masks + clipping, energy", "LINE"),
    "maxlogit": Entry(MaxLogit, {}, "largest logit"),
    "featurenorm": Entry(FeatureNorm, {}, "norm of a block's output; the block chosen by NormRatio (Yu et al.)"),
    # The paper's method
    "fmls": Entry(FMLS, {}, "feature masking + ReAct + logit smoothing, energy (the paper)", "Ours"),
    # Table III ablations (the same lambda as fmls)
    "react_fm": Entry(FMLS, {"smooth": False}, "ablation: ReAct + feature masking", "ReAct+FM"),
    "react_ls": Entry(FMLS, {"mask": False}, "ablation: ReAct + logit smoothing", "ReAct+LS"),
    "fm_ls": Entry(FMLS, {"clip": None}, "ablation: feature masking + logit smoothing, no ReAct", "FM+LS"),
    # Table IV combinations
    "msp_react": Entry(ReAct, {"output": "msp"}, "MSP of ReAct-clipped logits", "MSP+ReAct"),
    "msp_fmls": Entry(FMLS, {"output": "msp"}, "MSP of the paper's modulated logits", "MSP+Ours"),
    "energy_react": Entry(ReAct, {}, "same as react", "Energy+ReAct"),
    "energy_fmls": Entry(FMLS, {}, "same as fmls", "Energy+Ours"),
    "odin_react": Entry(odin_on(ReAct), {}, "ODIN on ReAct-clipped logits", "ODIN+ReAct"),
    "odin_fmls": Entry(odin_on(FMLS), {}, "ODIN on the paper's modulated logits", "ODIN+Ours"),
    "line_ls": Entry(LINE, {"smooth": True}, "LINE + logit smoothing", "LINE+Ours"),
}

# What `lightning-ood test` scores when the config names no scorers: every method of the paper's tables.
DEFAULT_SCORERS = [name for name in SCORERS if name not in ("maxlogit", "energy_react", "energy_fmls", "featurenorm")]


def accepted_arguments(build: Callable[..., Scorer]) -> set[str]:
    return getattr(build, "accepted", None) or set(inspect.signature(build).parameters)


def construct(build: Callable[..., Scorer], kwargs: dict[str, Any], name: str | None = None) -> Scorer:
    accepted = accepted_arguments(build)
    unknown = set(kwargs) - accepted
    if unknown:
        label = name or getattr(build, "__name__", "scorer")
        raise ConfigError(
            f"Scorer {label!r} has no hyperparameter {', '.join(sorted(map(repr, unknown)))}. "
            f"Valid: {', '.join(sorted(accepted)) or 'none'}."
        )
    try:
        return build(**kwargs)
    except TypeError as err:  # a value of the wrong kind that no check caught
        raise ConfigError(f"Scorer {name or getattr(build, '__name__', 'scorer')!r}: {err}.") from err


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """Instantiate the registered scorer ``name`` with its presets overridden by ``kwargs``.

    Raises:
        ConfigError: unknown name, unknown hyperparameter or invalid value.
    """
    if name not in SCORERS:
        raise unknown_name("scorer", name, SCORERS)
    entry = SCORERS[name]
    return construct(entry.build, {**entry.presets, **kwargs}, name)


def paper_name(name: str) -> str | None:
    """The method's name in the paper's tables (``None`` when the paper does not report it)."""
    entry = SCORERS.get(name)
    return entry.paper_name if entry else None
