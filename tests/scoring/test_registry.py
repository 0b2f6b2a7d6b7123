"""Scorers by name (lightning_ood/scoring/registry.py): every registered scorer builds, fits and scores through the
evaluation engine; unknown names and bad hyperparameters are refused; the OpenOOD group."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import SCORERS, build_scorer
from lightning_ood.statistics import Bank
from tests.scoring.conftest import engine_scores


@pytest.mark.numerics
def test_unknown_scorer_lists_choices():
    with pytest.raises(ConfigError, match="Unknown scorer 'nope'") as info:
        build_scorer("nope")
    for name in SCORERS:
        assert name in str(info.value)


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fmls", {"foo": 1}, "foo"),
        ("msp", {"temperature": 2}, "temperature"),
        ("odin_fmls", {"lam": 1}, "lam"),
        ("odin", {"percentile": 50}, "percentile"),
        ("fmls", {"percentile": 101}, "percentile"),
        ("fmls", {"percentile": -1}, "percentile"),
        ("fmls", {"clip_percentile": 100.5}, "clip_percentile"),
        ("react", {"percentile": 101}, "percentile"),
        ("react", {"percentile": -1}, "percentile"),
        ("dice", {"percentile": 101}, "percentile"),
        ("dice", {"percentile": -1}, "percentile"),
        ("dice_react", {"clip_percentile": -1}, "clip_percentile"),
        ("line", {"weight_percentile": 101}, "weight_percentile"),
        ("line", {"activation_percentile": -1}, "activation_percentile"),
        ("odin_fmls", {"percentile": 101}, "percentile"),
        ("fmls", {"clip": -0.1}, "clip"),
        ("react", {"clip": -1.0}, "clip"),
        ("dice", {"clip": -1.0}, "clip"),
        ("line", {"clip": -1.0}, "clip"),
        ("odin_react", {"clip": -1.0}, "clip"),
        ("bats", {"lam": -1.0}, "lam"),
        ("odin", {"temperature": 0}, "temperature"),
    ],
)
def test_build_scorer_rejects_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_scorer(name, **kwargs)


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(SCORERS))
def test_every_registered_scorer_builds_fits_and_scores(name, resnet):
    """Each registered scorer through the evaluation engine: finite (N,) scores."""
    scores = engine_scores(name, resnet.net, resnet.images, resnet.labels, resnet.x)
    assert scores.shape == (6,) and scores.dtype.is_floating_point and torch.isfinite(scores).all()


NEW = ("iodin", "gmm", "cfood", "grood")


def test_registered_in_the_openood_group():
    from lightning_ood.scoring.registry import GROUPS, SCORERS

    for name in NEW:
        assert name in SCORERS and name in GROUPS["openood"] and name in GROUPS["all"]
        assert re.search(r"[A-Z][a-z]+.*, [A-Za-z ]+ 20\d\d", SCORERS[name].paper)  # authors, venue and year
    assert build_scorer("iodin").needs.inputs and not build_scorer("gmm").needs.inputs
    assert all(build_scorer(name).needs.statistics == {Bank} for name in ("gmm", "cfood", "grood"))
