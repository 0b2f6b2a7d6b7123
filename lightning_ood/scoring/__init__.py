"""Post-hoc OOD scorers: tensors in, tensors out, higher score = more in-distribution.

from lightning_ood.scoring import build_scorer
scorer = build_scorer("fmls", percentile=60, clip=1.0)
scorer.fit(train_features, train_labels, head)   # (N, L), (N,), nn.Linear with weight (C, L)
scores = scorer.score(features, logits)           # (M, L), (M, C) -> (M,)
"""

from lightning_ood.scoring.base import LogitScorer, Scorer, energy, log_max_softmax
from lightning_ood.scoring.dice import DICE
from lightning_ood.scoring.featurenorm import FeatureNorm
from lightning_ood.scoring.fmls import FMLS, class_weight_mask, prototype_cosine
from lightning_ood.scoring.line import LINE
from lightning_ood.scoring.mahalanobis import Mahalanobis
from lightning_ood.scoring.odin import ODIN
from lightning_ood.scoring.output import MSP, Energy, MaxLogit
from lightning_ood.scoring.registry import DEFAULT_SCORERS, GROUPS, SCORERS, build_scorer, paper_name
from lightning_ood.scoring.shaping import BATS, ReAct

__all__ = [
    "BATS",
    "DEFAULT_SCORERS",
    "DICE",
    "FMLS",
    "GROUPS",
    "LINE",
    "MSP",
    "ODIN",
    "SCORERS",
    "Energy",
    "FeatureNorm",
    "LogitScorer",
    "Mahalanobis",
    "MaxLogit",
    "ReAct",
    "Scorer",
    "build_scorer",
    "class_weight_mask",
    "energy",
    "log_max_softmax",
    "paper_name",
    "prototype_cosine",
]
