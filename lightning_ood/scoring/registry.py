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
from lightning_ood.scoring.activation import ASH, SCALE, RankFeat
from lightning_ood.scoring.adascale import AdaSCALE
from lightning_ood.scoring.base import Scorer
from lightning_ood.scoring.boundary import FDBD, NCI, SHE
from lightning_ood.scoring.caref import CADRef, CARef
from lightning_ood.scoring.cfood import CFOOD
from lightning_ood.scoring.dice import DICE
from lightning_ood.scoring.ensemble import MahalanobisEnsemble, MahalanobisPaper
from lightning_ood.scoring.featurenorm import FeatureNorm
from lightning_ood.scoring.fmls import FMLS
from lightning_ood.scoring.gmm import GMM
from lightning_ood.scoring.graduncertainty import GradUncertainty, GradUncertaintyHead
from lightning_ood.scoring.gram import Gram
from lightning_ood.scoring.grood import GrOOD
from lightning_ood.scoring.iodin import IODIN
from lightning_ood.scoring.line import LINE
from lightning_ood.scoring.logits import GEN, Entropy, GradNorm, KLMatching, TemperatureScaling
from lightning_ood.scoring.lts import LTS
from lightning_ood.scoring.mahalanobis import RMDS, Mahalanobis
from lightning_ood.scoring.mahalanobis_odin import MahalanobisODIN
from lightning_ood.scoring.mahalanobis_pp import RMDSPP, MahalanobisPP
from lightning_ood.scoring.nac import NAC
from lightning_ood.scoring.neco import NECO
from lightning_ood.scoring.neighbours import KNN, NNGuide, Relation
from lightning_ood.scoring.odin import ODIN
from lightning_ood.scoring.openmax import OpenMax
from lightning_ood.scoring.ora import ORA
from lightning_ood.scoring.output import MSP, Energy, MaxLogit
from lightning_ood.scoring.pnml import PNML
from lightning_ood.scoring.shaping import BATS, ReAct
from lightning_ood.scoring.subspace import Residual, ViM
from lightning_ood.scoring.vra import VRA
from lightning_ood.scoring.weiper import WeiPer, WeiPerKLD


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
    build.base = base  # type: ignore[attr-defined]  (the method it combines with: its family)
    build.parts = (base, ODIN)  # type: ignore[attr-defined]  (the classes whose defaults it takes)
    return build


SCORERS: dict[str, Entry] = {
    # Baselines (Tables I, II)
    "msp": Entry(MSP, {}, "maximum softmax probability", "MSP"),
    "odin": Entry(ODIN, {}, "temperature scaling + input perturbation", "ODIN"),
    "mahalanobis": Entry(Mahalanobis, {}, "distance to the closest class mean, tied covariance (OpenOOD's mds)"),
    "mahalanobis_paper": Entry(
        MahalanobisPaper, {}, "Lee et al.'s layers, input noise, regression on ID vs FGSM (paper's code)", "Mahalanobis"
    ),
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
    # Further post-hoc detectors of OpenOOD v1.5 and pytorch-ood 0.4 (none is in the paper's tables)
    "knn": Entry(KNN, {}, "k-th nearest normalised training feature (Sun et al., ICML 2022)"),
    "vim": Entry(ViM, {}, "energy minus the scaled residual outside the principal subspace (Wang et al., CVPR 2022)"),
    "residual": Entry(Residual, {}, "norm of the residual outside the principal subspace (Wang et al., CVPR 2022)"),
    "gradnorm": Entry(GradNorm, {}, "L1 norm of the head's KL-to-uniform gradient (Huang et al., NeurIPS 2021)"),
    "klm": Entry(KLMatching, {}, "KL divergence to the closest predicted-class softmax template (Hendrycks et al.)"),
    "gen": Entry(GEN, {}, "generalized entropy of the top softmax probabilities (Liu et al., CVPR 2023)"),
    "entropy": Entry(Entropy, {}, "negative softmax entropy"),
    "temp_scaling": Entry(TemperatureScaling, {}, "MSP at the NLL-fitted temperature (Guo et al., ICML 2017)"),
    "rmds": Entry(RMDS, {}, "relative Mahalanobis distance (Ren et al., 2021)"),
    "mds_ensemble": Entry(
        MahalanobisEnsemble, {}, "Mahalanobis with input pre-processing, layer ensemble (Lee et al.)"
    ),
    "she": Entry(
        SHE, {}, "inner product with the predicted class's correct-training pattern (Zhang et al., ICLR 2023)"
    ),
    "nnguide": Entry(NNGuide, {}, "nearest-neighbour guidance of the energy (Park et al., ICCV 2023)"),
    "relation": Entry(Relation, {}, "relational kernel to the training features (Kim et al., NeurIPS 2023)"),
    "fdbd": Entry(FDBD, {}, "distance to the decision boundaries over distance to the mean (Liu & Qin, ICML 2024)"),
    "nci": Entry(NCI, {}, "alignment of the centred feature with the predicted class's weight (Liu et al., CVPR 2025)"),
    "ash_p": Entry(ASH, {"variant": "p"}, "activation pruning of the pooled feature (Djurisic et al., ICLR 2023)"),
    "ash_b": Entry(ASH, {"variant": "b"}, "activation pruning and binarisation (Djurisic et al., ICLR 2023)"),
    "ash_s": Entry(ASH, {"variant": "s"}, "activation pruning and scaling (Djurisic et al., ICLR 2023)"),
    "scale": Entry(SCALE, {}, "activation scaling of the pooled feature (Xu et al., ICLR 2024)"),
    # ours: ASH and SCALE on the final feature map before the pooling (the authors shape the pooled feature)
    "ash_p_map": Entry(ASH, {"variant": "p", "where": "map"}, "ash_p on the final feature map (ours)"),
    "ash_b_map": Entry(ASH, {"variant": "b", "where": "map"}, "ash_b on the final feature map (ours)"),
    "ash_s_map": Entry(ASH, {"variant": "s", "where": "map"}, "ash_s on the final feature map (ours)"),
    "scale_map": Entry(SCALE, {"where": "map"}, "scale on the final feature map (ours)"),
    "rankfeat": Entry(
        RankFeat, {}, "energy of the Block-3 and Block-4 paths' mean logits, rank-1 parts removed (Song et al.)"
    ),
    "rankfeat_block4": Entry(RankFeat, {"fuse": False}, "RankFeat on Block-4 alone (the authors' one-block variant)"),
    "gram": Entry(
        Gram, {}, "deviation of the blocks' Gram features from their training range (Sastry & Oore, ICML 2020)"
    ),
    "openmax": Entry(OpenMax, {}, "extreme-value revision of the logits (Bendale & Boult, CVPR 2016)"),
    "iodin": Entry(IODIN, {}, "ODIN perturbing one input value, the largest gradient's (Regmi, arXiv 2024, ASCOOD)"),
    "gmm": Entry(GMM, {}, "tied Gaussian mixture by EM on PCA-50 features, OpenOOD's (Yang et al., IJCV 2023, SEM)"),
    "cfood": Entry(CFOOD, {}, "concentration-free outlier factor in the training bank (Angiulli et al., SISAP 2025)"),
    "grood": Entry(GrOOD, {}, "nearest training gradient w.r.t. an OOD prototype (ElAraby et al., TMLR 2025)"),
    "weiper": Entry(WeiPer, {}, "mean MSP of 100 randomly perturbed heads, WeiPer+MSP (Granz et al., NeurIPS 2024)"),
    "weiper_kld": Entry(
        WeiPerKLD, {}, "WeiPer's MSP minus KL of feature and perturbed-logit densities (Granz et al., NeurIPS 2024)"
    ),
    "caref": Entry(CARef, {}, "relative L1 error to the predicted class's training mean (Ling et al., CVPR 2025)"),
    "cadref": Entry(
        CADRef, {}, "CARef's error split by the class weights' sign, over logit scores (Ling et al., CVPR 2025)"
    ),
    "ora": Entry(
        ORA, {}, "largest angle to a decision-boundary projection, from the ID centre (Demirel et al., NeurIPS 2025)"
    ),
    "mahalanobis_pp": Entry(
        MahalanobisPP, {}, "Mahalanobis on L2-normalised features, Mahalanobis++ (Mueller & Hein, ICML 2025)"
    ),
    "rmds_pp": Entry(RMDSPP, {}, "relative Mahalanobis on L2-normalised features, RMDS++ (Mueller & Hein, ICML 2025)"),
    "mahalanobis_odin": Entry(
        MahalanobisODIN, {}, "penultimate Mahalanobis, input pre-processing (Lee et al., NeurIPS 2018; pytorch-ood's)"
    ),
    "neco": Entry(NECO, {}, "norm share in the standardised principal subspace (Ben Ammar et al., ICLR 2024)"),
    "lts": Entry(LTS, {}, "logits scaled by the squared activation-mass ratio, energy (Djurisic et al., MVA 2025)"),
    "pnml": Entry(PNML, {}, "single-layer pNML regret of the normalised feature (Bibas et al., NeurIPS 2021)"),
    "vra": Entry(VRA, {}, "per-unit rectification: 0 below alpha, beta above, energy (Xu et al., NeurIPS 2023)"),
    "vra_plus": Entry(
        VRA, {"upper": 95.0, "gamma": 0.6}, "VRA+: kept activations raised by gamma (Xu et al., NeurIPS 2023)"
    ),
    "vra_plusplus": Entry(
        VRA,
        {"lower": 50.0, "upper": 85.0, "norm_weight": 0.01, "norm_centre": 4.0},
        "VRA++: VRA minus a * ||h - m||^2 of the raw feature (Xu et al., NeurIPS 2023)",
    ),
    "vra_openood": Entry(
        VRA,
        {"lower": 10.0, "upper": 90.0, "per_unit": False, "below": "clamp", "reference": "id_val"},
        "OpenOOD's VRA: all units clamped to their 10th-90th ID-val percentiles, energy (not the authors')",
    ),
    "graduncertainty": Entry(
        GradUncertainty, {}, "squared gradient norms of a confounding all-ones label (Lee & AlRegib, ICIP 2020)"
    ),
    "graduncertainty_head": Entry(
        GradUncertaintyHead, {}, "graduncertainty on the head's weight and bias alone, closed form (ours)"
    ),
    "adascale_a": Entry(
        AdaSCALE, {"variant": "a"}, "SCALE at a per-image percentile set by a perturbation's shift (Regmi, arXiv 2025)"
    ),
    "adascale_l": Entry(
        AdaSCALE, {"variant": "l"}, "AdaSCALE's ratio squared scaling the logits (Regmi, arXiv 2025, AdaSCALE-L)"
    ),
    "nac": Entry(NAC, {}, "training coverage of the neurons' KL-gradient states, NAC-UE (Liu et al., ICLR 2024)"),
}

# The paper's method: what `lightning-ood tune` tunes when told no scorer.
PAPER_METHOD = "fmls"
# What `lightning-ood test` scores when the config names no scorers: every method of the paper's tables.
PAPER_SCORERS = [name for name in SCORERS if SCORERS[name].paper_name and name not in ("energy_react", "energy_fmls")]
DEFAULT_SCORERS = PAPER_SCORERS
# OpenOOD v1.5's post-hoc methods that need only a trained classifier, by OpenOOD's names where they differ (msp,
# odin, mds, ebo, mls, ...).
OPENOOD_SCORERS = [
    "msp", "odin", "mahalanobis", "mds_ensemble", "rmds", "gram", "energy", "openmax", "maxlogit", "klm", "vim",
    "knn", "dice", "rankfeat", "ash_b", "she", "gen", "nnguide", "relation", "scale", "fdbd", "nci", "react",
    "temp_scaling", "gradnorm", "residual", "bats",
    "vra",
    "iodin", "gmm", "cfood", "grood",
    "adascale_a", "adascale_l",
]  # fmt: skip
GROUPS = {
    "paper": PAPER_SCORERS,
    "openood": OPENOOD_SCORERS,
    "all": [name for name in SCORERS if name not in ("energy_react", "energy_fmls")],
}


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


def family(name: str) -> type[Scorer] | None:
    """The scorer class a registered name builds (for ODIN on a base method: the base's), so that a choice made for
    one method applies to its registered variants (``fmls``, ``react_fm``, ``msp_fmls``, ``odin_fmls``, ...)."""
    entry = SCORERS.get(name)
    if entry is None:
        return None
    return entry.build if isinstance(entry.build, type) else getattr(entry.build, "base", None)


def presets(name: str) -> dict[str, Any]:
    """The hyperparameters a registered name fixes (``fm_ls``: ``clip: None``, no ReAct)."""
    entry = SCORERS.get(name)
    return dict(entry.presets) if entry is not None else {}


def defaults(name: str) -> dict[str, Any]:
    """Every hyperparameter a registered name sets when the config gives none: its presets, then the constructor
    defaults of what it builds (ODIN on another method: the method's, then ODIN's)."""
    entry = SCORERS[name]
    found: dict[str, Any] = {}
    for build in getattr(entry.build, "parts", (entry.build,)):
        parameters = inspect.signature(build).parameters.items()
        found.update({k: p.default for k, p in parameters if p.default is not p.empty and k not in found})
    return {**found, **entry.presets}


def paper_name(name: str) -> str | None:
    """The method's name in the paper's tables (``None`` when the paper does not report it)."""
    entry = SCORERS.get(name)
    return entry.paper_name if entry else None
