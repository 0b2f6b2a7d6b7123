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
    paper: str = ""  # the method's paper and venue (or where the variant comes from)
    differs: str = ""  # how this scorer differs from its authors' code ("" where it computes what they compute)
    test: str = ""  # the test that checks it against an independent reference (a node id under tests/)


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
    "msp": Entry(
        MSP,
        {},
        "maximum softmax probability",
        "MSP",
        paper="Hendrycks & Gimpel, ICLR 2017",
        differs=(
            "scored as log p_max in float64, an increasing function of the authors' MSP (no ties where float32 rounds "
            "p to 1)"
        ),
        test="tests/scoring/test_output.py::test_msp_energy_maxlogit",
    ),
    "odin": Entry(
        ODIN,
        {},
        "temperature scaling + input perturbation",
        "ODIN",
        paper="Liang et al., ICLR 2018",
        differs=(
            "eps 0.0014 with the gradient sign divided by the std (ODIN's and OpenOOD's code; the paper's code: eps "
            "0.004, no division, scale_by_std: false); scored as log p_max"
        ),
        test="tests/scoring/test_odin.py::test_odin_matches_manual_autograd",
    ),
    "mahalanobis": Entry(
        Mahalanobis,
        {},
        "distance to the closest class mean, tied covariance (OpenOOD's mds)",
        paper="Lee et al., NeurIPS 2018",
        differs=(
            "penultimate features only, no input pre-processing or layer ensemble (OpenOOD's mds); the paper's row is "
            "mahalanobis_paper"
        ),
        test="tests/scoring/test_mahalanobis.py::test_mahalanobis_matches_sklearn_and_pinv",
    ),
    "mahalanobis_paper": Entry(
        MahalanobisPaper,
        {},
        "Lee et al.'s layers, input noise, regression on ID vs FGSM (paper's code)",
        "Mahalanobis",
        paper="Lee et al., NeurIPS 2018, as the paper's code runs it",
        differs=(
            "regression and noise magnitude fitted on 1,000 seeded ID training images; the authors took them from the "
            "ID test set they then scored"
        ),
        test="tests/scoring/test_ensemble.py::test_mahalanobis_paper_against_the_authors",
    ),
    "energy": Entry(
        Energy,
        {},
        "logsumexp of the logits",
        "Energy",
        paper="Liu et al., NeurIPS 2020",
        test="tests/scoring/test_output.py::test_msp_energy_maxlogit",
    ),
    "bats": Entry(
        BATS,
        {},
        "per-unit truncation to mean +- lam * std, energy",
        "BATS",
        paper="Zhu et al., NeurIPS 2022",
        differs=(
            "statistics: bn truncates the last BatchNorm's output (the paper's definition); the authors' released "
            "CIFAR code bounds the pooled features (statistics: bn_pooled)"
        ),
        test="tests/scoring/test_shaping.py::test_bats_truncates_to_training_mean_plus_minus_lam_std",
    ),
    "dice": Entry(
        DICE,
        {},
        "head sparsified by contribution, energy",
        "DICE",
        paper="Sun & Li, ECCV 2022",
        test="tests/scoring/test_dice.py::test_dice_matches_reference",
    ),
    "react": Entry(
        ReAct,
        {},
        "features clipped at the 90th percentile, energy",
        "ReAct",
        paper="Sun et al., NeurIPS 2021",
        differs=(
            "threshold from the training activations by default; reference: id_val is OpenOOD's, id_test the authors' "
            "run (test-set leakage, flagged in the results)"
        ),
        test="tests/scoring/test_shaping.py::test_react_threshold_is_the_90th_percentile_of_all_training_activations",
    ),
    "dice_react": Entry(
        DICE,
        {"clip_percentile": 90.0},
        "ReAct clipping, then DICE",
        "DICE+ReAct",
        paper="Sun & Li, ECCV 2022",
        differs="ReAct's threshold as react",
        test="tests/scoring/test_dice.py::test_dice_matches_reference",
    ),
    "line": Entry(
        LINE,
        {},
        "Shapley-based unit and weight masks + clipping, energy",
        "LINE",
        paper="Ahn et al., CVPR 2023",
        test="tests/scoring/test_line.py::test_line_matches_reference",
    ),
    "maxlogit": Entry(
        MaxLogit,
        {},
        "largest logit",
        paper="Hendrycks et al., ICML 2022",
        test="tests/scoring/test_output.py::test_msp_energy_maxlogit",
    ),
    "featurenorm": Entry(
        FeatureNorm,
        {},
        "norm of a block's output; the block chosen by NormRatio",
        paper="Yu et al., CVPR 2023",
        differs=(
            "NormRatio's jigsaws seeded per image (reproducible, identical under DDP); normratio_images takes a seeded "
            "subset"
        ),
        test="tests/scoring/test_featurenorm.py::test_featurenorm_scorer",
    ),
    # The paper's method
    "fmls": Entry(
        FMLS,
        {},
        "feature masking + ReAct + logit smoothing, energy (the paper)",
        "Ours",
        paper="Sun, Qiu, Tan, Zheng & Wang: feature masking and logit smoothing (the paper)",
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    # Table III ablations (the same lambda as fmls)
    "react_fm": Entry(
        FMLS,
        {"smooth": False},
        "ablation: ReAct + feature masking",
        "ReAct+FM",
        paper="Sun et al., Table III ablation of the paper",
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    "react_ls": Entry(
        FMLS,
        {"mask": False},
        "ablation: ReAct + logit smoothing",
        "ReAct+LS",
        paper="Sun et al., Table III ablation of the paper",
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    "fm_ls": Entry(
        FMLS,
        {"clip": None},
        "ablation: feature masking + logit smoothing, no ReAct",
        "FM+LS",
        paper="Sun et al., Table III ablation of the paper",
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    # Table IV combinations
    "msp_react": Entry(
        ReAct,
        {"output": "msp"},
        "MSP of ReAct-clipped logits",
        "MSP+ReAct",
        paper="Sun et al., Table IV combination of the paper",
        differs=(
            "scored as log p_max in float64, an increasing function of the authors' MSP (no ties where float32 rounds "
            "p to 1)"
        ),
        test="tests/scoring/test_shaping.py::test_react_variants",
    ),
    "msp_fmls": Entry(
        FMLS,
        {"output": "msp"},
        "MSP of the paper's modulated logits",
        "MSP+Ours",
        paper="Sun et al., Table IV combination of the paper",
        differs=(
            "scored as log p_max in float64, an increasing function of the authors' MSP (no ties where float32 rounds "
            "p to 1)"
        ),
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    "energy_react": Entry(
        ReAct,
        {},
        "same as react",
        "Energy+ReAct",
        paper="Sun et al., Table IV combination of the paper",
        differs="an alias of react",
        test="tests/scoring/test_shaping.py::test_react_threshold_is_the_90th_percentile_of_all_training_activations",
    ),
    "energy_fmls": Entry(
        FMLS,
        {},
        "same as fmls",
        "Energy+Ours",
        paper="Sun et al., Table IV combination of the paper",
        differs="an alias of fmls",
        test="tests/scoring/test_fmls.py::test_fmls_family_matches_reference",
    ),
    "odin_react": Entry(
        odin_on(ReAct),
        {},
        "ODIN on ReAct-clipped logits",
        "ODIN+ReAct",
        paper="Sun et al., Table IV combination of the paper",
        differs="ODIN as odin",
        test="tests/scoring/test_odin.py::test_odin_on_a_base_scorer_uses_its_logits_in_both_passes",
    ),
    "odin_fmls": Entry(
        odin_on(FMLS),
        {},
        "ODIN on the paper's modulated logits",
        "ODIN+Ours",
        paper="Sun et al., Table IV combination of the paper",
        differs="ODIN as odin",
        test="tests/scoring/test_odin.py::test_odin_on_a_base_scorer_uses_its_logits_in_both_passes",
    ),
    "line_ls": Entry(
        LINE,
        {"smooth": True},
        "LINE + logit smoothing",
        "LINE+Ours",
        paper="Sun et al., Table IV combination of the paper",
        test="tests/scoring/test_line.py::test_line_matches_reference",
    ),
    # Further post-hoc detectors of OpenOOD v1.5 and pytorch-ood 0.4 (none is in the paper's tables)
    "knn": Entry(
        KNN,
        {},
        "k-th nearest normalised training feature",
        paper="Sun et al., ICML 2022",
        differs="ranks by the distance, the same order as faiss's squared distance",
        test="tests/scoring/test_neighbours.py::test_knn",
    ),
    "vim": Entry(
        ViM,
        {},
        "energy minus the scaled residual outside the principal subspace",
        paper="Wang et al., CVPR 2022",
        test="tests/scoring/test_subspace.py::test_vim_and_residual",
    ),
    "residual": Entry(
        Residual,
        {},
        "norm of the residual outside the principal subspace",
        paper="Wang et al., CVPR 2022",
        differs="fitted on the training features; OpenOOD fits it on its ID validation split",
        test="tests/scoring/test_subspace.py::test_vim_and_residual",
    ),
    "gradnorm": Entry(
        GradNorm,
        {},
        "L1 norm of the head's KL-to-uniform gradient",
        paper="Huang et al., NeurIPS 2021",
        differs="closed form of the head's gradient, averaged over the classes (OpenOOD sums: the same order)",
        test="tests/scoring/test_logits.py::test_gradnorm_equals_the_autograd_definition",
    ),
    "klm": Entry(
        KLMatching,
        {},
        "KL divergence to the closest predicted-class softmax template",
        paper="Hendrycks et al., ICML 2022",
        differs="templates from held-out ID images (reference: id_val); reference: train is not the authors'",
        test="tests/scoring/test_logits.py::test_klm",
    ),
    "gen": Entry(
        GEN,
        {},
        "generalized entropy of the top softmax probabilities",
        paper="Liu et al., CVPR 2023",
        differs="exact 1 - p in float64, unclipped (pytorch-ood clips p to [1e-7, 1 - 1e-7])",
        test="tests/scoring/test_logits.py::test_gen_and_entropy",
    ),
    "entropy": Entry(
        Entropy,
        {},
        "negative softmax entropy",
        paper="softmax-entropy baseline of OpenOOD v1.5 and pytorch-ood",
        differs="exact log p in float64 (pytorch-ood clips p at 1e-7)",
        test="tests/scoring/test_logits.py::test_gen_and_entropy",
    ),
    "temp_scaling": Entry(
        TemperatureScaling,
        {},
        "MSP at the NLL-fitted temperature",
        paper="Guo et al., ICML 2017",
        differs="temperature fitted on held-out ID images (reference: id_val); scored as log p_max",
        test="tests/scoring/test_logits.py::test_temperature_scaling_finds_the_nll_minimum",
    ),
    "rmds": Entry(
        RMDS,
        {},
        "relative Mahalanobis distance",
        paper="Ren et al., arXiv 2021",
        test="tests/scoring/test_mahalanobis.py::test_rmds",
    ),
    "mds_ensemble": Entry(
        MahalanobisEnsemble,
        {},
        "Mahalanobis with input pre-processing, layer ensemble",
        paper="Lee et al., NeurIPS 2018",
        differs="the layers combined with equal weights (no regression)",
        test="tests/scoring/test_ensemble.py::test_mds_ensemble_against_lee_et_al",
    ),
    "she": Entry(
        SHE,
        {},
        "inner product with the predicted class's correct-training pattern",
        paper="Zhang et al., ICLR 2023",
        test="tests/scoring/test_boundary.py::test_she_fdbd_nci",
    ),
    "nnguide": Entry(
        NNGuide,
        {},
        "nearest-neighbour guidance of the energy",
        paper="Park et al., ICCV 2023",
        test="tests/scoring/test_neighbours.py::test_nnguide",
    ),
    "relation": Entry(
        Relation,
        {},
        "relational kernel to the training features",
        paper="Kim et al., NeurIPS 2023",
        test="tests/scoring/test_neighbours.py::test_relation",
    ),
    "fdbd": Entry(
        FDBD,
        {},
        "distance to the decision boundaries over distance to the mean",
        paper="Liu & Qin, ICML 2024",
        differs="averages over the classes",
        test="tests/scoring/test_boundary.py::test_she_fdbd_nci",
    ),
    "nci": Entry(
        NCI,
        {},
        "alignment of the centred feature with the predicted class's weight",
        paper="Liu et al., CVPR 2025",
        test="tests/scoring/test_boundary.py::test_she_fdbd_nci",
    ),
    "ash_p": Entry(
        ASH,
        {"variant": "p"},
        "activation pruning of the pooled feature",
        paper="Djurisic et al., ICLR 2023",
        test="tests/scoring/test_activation.py::test_ash_on_pooled_features",
    ),
    "ash_b": Entry(
        ASH,
        {"variant": "b"},
        "activation pruning and binarisation",
        paper="Djurisic et al., ICLR 2023",
        test="tests/scoring/test_activation.py::test_ash_on_pooled_features",
    ),
    "ash_s": Entry(
        ASH,
        {"variant": "s"},
        "activation pruning and scaling",
        paper="Djurisic et al., ICLR 2023",
        test="tests/scoring/test_activation.py::test_ash_on_pooled_features",
    ),
    "scale": Entry(
        SCALE,
        {},
        "activation scaling of the pooled feature",
        paper="Xu et al., ICLR 2024",
        test="tests/scoring/test_activation.py::test_scale_on_pooled_features",
    ),
    # ours: ASH and SCALE on the final feature map before the pooling (the authors shape the pooled feature)
    "ash_p_map": Entry(
        ASH,
        {"variant": "p", "where": "map"},
        "ash_p on the final feature map (ours)",
        paper="Djurisic et al., ICLR 2023",
        differs=(
            "ours: on the final feature map before the pooling (pytorch-ood's placement); the authors shape the pooled "
            "feature"
        ),
        test="tests/scoring/test_activation.py::test_ash_and_scale_on_the_final_feature_map",
    ),
    "ash_b_map": Entry(
        ASH,
        {"variant": "b", "where": "map"},
        "ash_b on the final feature map (ours)",
        paper="Djurisic et al., ICLR 2023",
        differs=(
            "ours: on the final feature map before the pooling (pytorch-ood's placement); the authors shape the pooled "
            "feature"
        ),
        test="tests/scoring/test_activation.py::test_ash_and_scale_on_the_final_feature_map",
    ),
    "ash_s_map": Entry(
        ASH,
        {"variant": "s", "where": "map"},
        "ash_s on the final feature map (ours)",
        paper="Djurisic et al., ICLR 2023",
        differs=(
            "ours: on the final feature map before the pooling (pytorch-ood's placement); the authors shape the pooled "
            "feature"
        ),
        test="tests/scoring/test_activation.py::test_ash_and_scale_on_the_final_feature_map",
    ),
    "scale_map": Entry(
        SCALE,
        {"where": "map"},
        "scale on the final feature map (ours)",
        paper="Xu et al., ICLR 2024",
        differs=(
            "ours: on the final feature map before the pooling (pytorch-ood's placement); the authors scale the pooled "
            "feature"
        ),
        test="tests/scoring/test_activation.py::test_ash_and_scale_on_the_final_feature_map",
    ),
    "rankfeat": Entry(
        RankFeat,
        {},
        "energy of the Block-3 and Block-4 paths' mean logits, rank-1 parts removed",
        paper="Song et al., NeurIPS 2022",
        test="tests/scoring/test_activation.py::test_rankfeat_averages_the_block3_and_block4_logits_on_the_cifar_resnet18",
    ),
    "rankfeat_block4": Entry(
        RankFeat,
        {"fuse": False},
        "RankFeat on Block-4 alone (the authors' one-block variant)",
        paper="Song et al., NeurIPS 2022",
        differs="the authors' one-block variant",
        test="tests/scoring/test_activation.py::test_rankfeat_block4",
    ),
    "gram": Entry(
        Gram,
        {},
        "deviation of the blocks' Gram features from their training range",
        paper="Sastry & Oore, ICML 2020",
        differs="a fixed held-out split for the normaliser (pytorch-ood draws it at random)",
        test="tests/scoring/test_gram.py::test_gram_statistics_and_score",
    ),
    "openmax": Entry(
        OpenMax,
        {},
        "extreme-value revision of the logits",
        paper="Bendale & Boult, CVPR 2016",
        differs="centred on the correctly classified images; scored as -log p(unknown)",
        test="tests/scoring/test_openmax.py::test_openmax_matches_pytorch_ood",
    ),
    "iodin": Entry(
        IODIN,
        {},
        "ODIN perturbing one input value, the largest gradient's",
        paper="Regmi, arXiv 2024 (ASCOOD)",
        test="tests/scoring/test_iodin.py::test_iodin_matches_the_authors_postprocessor",
    ),
    "gmm": Entry(
        GMM,
        {},
        "tied Gaussian mixture by EM on PCA-50 features, OpenOOD's",
        paper="Yang et al., IJCV 2023 (SEM), OpenOOD's gmm",
        differs="on the penultimate features where OpenOOD's gmm.yml reads layer2's map; no underflow floor",
        test="tests/scoring/test_gmm.py::test_gmm_em_matches_sklearn_from_the_same_start",
    ),
    "cfood": Entry(
        CFOOD,
        {},
        "concentration-free outlier factor in the training bank",
        paper="Angiulli, Fassetti & Zupi, SISAP 2025",
        differs="the reference share drawn by a seeded generator",
        test="tests/scoring/test_cfood.py::test_cfood_matches_the_authors_postprocessor",
    ),
    "grood": Entry(
        GrOOD,
        {},
        "nearest training gradient w.r.t. an OOD prototype",
        paper="ElAraby et al., TMLR 2025",
        differs=(
            "OOD prototype the mean of the class prototypes (ood_prototype: noise for their blurred noise), not their "
            "100 OOD validation images"
        ),
        test="tests/scoring/test_grood.py::test_grood_matches_the_authors_postprocessor",
    ),
    "weiper": Entry(
        WeiPer,
        {},
        "mean MSP of 100 randomly perturbed heads, WeiPer+MSP",
        paper="Granz et al., NeurIPS 2024",
        differs=(
            "one seeded draw of the perturbed heads, the same on every process (the authors draw anew per batch); "
            "scored as -log(1 - mean MSP)"
        ),
        test="tests/scoring/test_weiper.py::test_weiper_msp",
    ),
    "weiper_kld": Entry(
        WeiPerKLD,
        {},
        "WeiPer's MSP minus KL of feature and perturbed-logit densities",
        paper="Granz et al., NeurIPS 2024",
        differs="one seeded draw of the perturbed heads, the same on every process",
        test="tests/scoring/test_weiper.py::test_weiper_kld",
    ),
    "caref": Entry(
        CARef,
        {},
        "relative L1 error to the predicted class's training mean",
        paper="Ling et al., CVPR 2025",
        test="tests/scoring/test_caref.py::test_caref",
    ),
    "cadref": Entry(
        CADRef,
        {},
        "CARef's error split by the class weights' sign, over logit scores",
        paper="Ling et al., CVPR 2025",
        test="tests/scoring/test_caref.py::test_cadref",
    ),
    "ora": Entry(
        ORA,
        {},
        "largest angle to a decision-boundary projection, from the ID centre",
        paper="Demirel, Fumero & Locatello, NeurIPS 2025",
        differs="class means of the training images (reference: id_test: the authors' ID test features)",
        test="tests/scoring/test_ora.py::test_ora",
    ),
    "mahalanobis_pp": Entry(
        MahalanobisPP,
        {},
        "Mahalanobis on L2-normalised features, Mahalanobis++",
        paper="Mueller & Hein, ICML 2025",
        test="tests/scoring/test_mahalanobis_pp.py::test_mahalanobis_pp_matches_the_authors_code",
    ),
    "rmds_pp": Entry(
        RMDSPP,
        {},
        "relative Mahalanobis on L2-normalised features, RMDS++",
        paper="Mueller & Hein, ICML 2025",
        test="tests/scoring/test_mahalanobis_pp.py::test_rmds_pp_matches_the_authors_code",
    ),
    "mahalanobis_odin": Entry(
        MahalanobisODIN,
        {},
        "penultimate Mahalanobis, input pre-processing",
        paper="Lee et al., NeurIPS 2018, as pytorch-ood runs it",
        differs="mds_ensemble on the last layer alone but for sign(0) = 0",
        test="tests/scoring/test_mahalanobis_odin.py::test_mahalanobis_odin_against_autograd_and_pytorch_ood",
    ),
    "neco": Entry(
        NECO,
        {},
        "norm share in the standardised principal subspace",
        paper="Ben Ammar et al., ICLR 2024",
        differs="d: half the features below 200-d (ours)",
        test="tests/scoring/test_neco.py::test_neco_matches_the_authors_code",
    ),
    "lts": Entry(
        LTS,
        {},
        "logits scaled by the squared activation-mass ratio, energy",
        paper="Djurisic, Liu & Nikolic, MVA 2025",
        differs="an all-zero feature gets a factor of 1 (0 / 0 in the authors' code)",
        test="tests/scoring/test_lts.py::test_lts_follows_the_authors_code",
    ),
    "pnml": Entry(
        PNML,
        {},
        "single-layer pNML regret of the normalised feature",
        paper="Bibas, Feder & Hassner, NeurIPS 2021",
        differs="genies in log form, finite where p is 0 or 1; 1 - regret in float64",
        test="tests/scoring/test_pnml.py::test_pnml_follows_the_authors_code",
    ),
    "vra": Entry(
        VRA,
        {},
        "per-unit rectification: 0 below alpha, beta above, energy",
        paper="Xu et al., NeurIPS 2023",
        test="tests/scoring/test_vra.py::test_vra_follows_the_authors_code",
    ),
    "vra_plus": Entry(
        VRA,
        {"upper": 95.0, "gamma": 0.6},
        "VRA+: kept activations raised by gamma",
        paper="Xu et al., NeurIPS 2023",
        test="tests/scoring/test_vra.py::test_vra_follows_the_authors_code",
    ),
    "vra_plusplus": Entry(
        VRA,
        {"lower": 50.0, "upper": 85.0, "norm_weight": 0.01, "norm_centre": 4.0},
        "VRA++: VRA minus a * ||h - m||^2 of the raw feature",
        paper="Xu et al., NeurIPS 2023",
        test="tests/scoring/test_vra.py::test_vra_follows_the_authors_code",
    ),
    "vra_openood": Entry(
        VRA,
        {"lower": 10.0, "upper": 90.0, "per_unit": False, "below": "clamp", "reference": "id_val"},
        "OpenOOD's VRA: all units clamped to their 10th-90th ID-val percentiles, energy (not the authors')",
        paper="Xu et al., NeurIPS 2023, as OpenOOD runs it",
        differs=(
            "OpenOOD's, not the authors': one threshold pair over all units from the id_val features, clamped below"
        ),
        test="tests/scoring/test_vra.py::test_vra_openood_follows_openoods_postprocessor",
    ),
    "graduncertainty": Entry(
        GradUncertainty,
        {},
        "squared gradient norms of a confounding all-ones label",
        paper="Lee & AlRegib, ICIP 2020, as pytorch-ood runs it",
        differs="a post-hoc score; the authors train a classifier on ID and OOD gradients",
        test="tests/scoring/test_graduncertainty.py::test_graduncertainty_every_parameter_equals_autograd_and_pytorch_ood",
    ),
    "graduncertainty_head": Entry(
        GradUncertaintyHead,
        {},
        "graduncertainty on the head's weight and bias alone, closed form (ours)",
        paper="Lee & AlRegib, ICIP 2020",
        differs="ours: the head's weight and bias alone, in closed form",
        test="tests/scoring/test_graduncertainty.py::test_graduncertainty_head_equals_autograd_and_pytorch_ood",
    ),
    "adascale_a": Entry(
        AdaSCALE,
        {"variant": "a"},
        "SCALE at a per-image percentile set by a perturbation's shift",
        paper="Regmi, arXiv 2025",
        differs="ECDF fitted on at most 5,000 id_val images",
        test="tests/scoring/test_adascale.py::test_adascale_agrees_with_the_authors_computation",
    ),
    "adascale_l": Entry(
        AdaSCALE,
        {"variant": "l"},
        "AdaSCALE's ratio squared scaling the logits",
        paper="Regmi, arXiv 2025",
        differs="ECDF fitted on at most 5,000 id_val images",
        test="tests/scoring/test_adascale.py::test_adascale_agrees_with_the_authors_computation",
    ),
    "nac": Entry(
        NAC,
        {},
        "training coverage of the neurons' KL-gradient states, NAC-UE",
        paper="Liu et al., ICLR 2024",
        differs="coverage counted on 1,000 seeded training images (the authors': 1,000 class-balanced)",
        test="tests/scoring/test_nac.py::test_nac_agrees_with_the_authors_computation",
    ),
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
