"""The evaluation engine without Lightning: the docs' plain PyTorch loop runs as written, and the engine refuses
to score before it is fitted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.engine import Engine
from lightning_ood.models import build_backbone

LIBRARY = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def docs_code(heading: str) -> str:
    text = LIBRARY.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_plain_pytorch_loop_runs(tmp_path):
    """The docs' engine example (docs/library.md), run as written on the CPU, with random weights instead of the
    download, four classes and a few random images instead of ImageNet: the engine's scores, the evaluation's report
    and its files."""
    code = docs_code("## The benchmark without Lightning")
    swaps = {
        'device = "cuda"': 'device = "cpu"',
        'weights="IMAGENET1K_V1"': "weights=None",
        "num_classes=1000": "num_classes=4",
        'report.write("results")': "report.write(results)",
    }
    for old, new in swaps.items():
        assert old in code
        code = code.replace(old, new)
    torch.manual_seed(0)
    namespace = {
        "train_images": TensorDataset(torch.rand(64, 3, 32, 32), torch.arange(64) % 4),  # >= knn's k = 50
        "test_sets": [TensorDataset(torch.rand(n, 3, 32, 32), torch.arange(n) % 4) for n in (6, 5, 7)],
        "results": tmp_path,
    }
    exec(compile(code, str(LIBRARY), "exec"), namespace)
    scores, logits, report = namespace["scores"], namespace["logits"], namespace["report"]
    assert list(scores) == ["msp", "energy", "react", "fmls", "knn", "odin"] and logits.shape == (7, 4)
    assert all(s.shape == (7,) and torch.isfinite(s).all() for s in scores.values())
    assert report.num_images == {"imagenet": 6, "inaturalist": 5, "textures": 7}
    assert list(report.metrics) == list(scores) and set(report.metrics["fmls"]) == {"inaturalist", "textures"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood_results.csv", "ood_results.json", "ood_results.md",
                                                          "ood_results.tex", "ood_scores.pt"]  # fmt: skip
    written = torch.load(tmp_path / "ood_scores.pt", weights_only=True)
    assert torch.equal(written["scores"]["knn"]["textures"], scores["knn"])  # the last set: one batch, in order


def test_an_engine_scores_only_once_fitted():
    net = build_backbone("resnet20", 4)
    engine = Engine(net, ["msp"])
    with pytest.raises(RuntimeError, match="fit"):
        engine(torch.rand(2, 3, 32, 32))


def test_a_detector_with_a_new_statistic_is_one_class_and_one_registry_line(monkeypatch):
    """What a newcomer writes for a detector that needs a statistic nobody accumulates yet: a Statistic registered
    by name beside a Scorer that lists it; the engine accumulates it in the same pass, fits and scores, and the
    checkpoint layout carries it."""
    from torch import Tensor

    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.engine import accumulate_statistics
    from lightning_ood.scoring.base import Scorer
    from lightning_ood.scoring.registry import SCORERS, Entry
    from lightning_ood.statistics import Bank, FeatureStatistics, Statistic

    class UnitMaxima(Statistic):
        name = "unit_maxima"
        fields = ("unit_maxima",)

        def __init__(self, setup):
            super().__init__(setup)
            self.maxima = torch.full((setup.feature_dim,), -torch.inf, dtype=torch.float64)

        def update(self, batch):
            self.maxima = torch.maximum(self.maxima, batch.features.double().cpu().amax(dim=0))

        def compute(self, core, reduce):
            return {"unit_maxima": reduce.max(self.maxima)}

    class AboveMaxima(Scorer):
        needs_statistics = frozenset({UnitMaxima})  # the statistic is declared by the class itself

        def fit_statistics(self, stats, head):
            self.maxima = stats.unit_maxima.to(head.weight.dtype)
            return self

        def score(self, features: Tensor, logits: Tensor) -> Tensor:
            return -(features - self.maxima).clamp_min(0).sum(dim=1)

    monkeypatch.setitem(SCORERS, "above_maxima", Entry(AboveMaxima))  # and the scorer's
    torch.manual_seed(0)
    net = build_backbone("resnet20", 4).eval()
    engine = Engine(net, ["above_maxima", "msp"])
    assert engine.needs.statistics == {UnitMaxima}
    images = torch.rand(24, 3, 32, 32)
    loader = DataLoader(IndexedDataset(TensorDataset(images, torch.arange(24) % 4)), batch_size=10)
    stats = accumulate_statistics(net, loader, engine.needs.statistics, progress=False)
    with torch.no_grad():
        features = net.features(images)
    torch.testing.assert_close(stats.unit_maxima, features.double().amax(dim=0))
    restored = FeatureStatistics.from_state_dict(stats.cpu_state_dict())
    assert restored.provides({UnitMaxima}) == set() and restored.provides({Bank}) == {Bank}
    _, scores = engine.fit(restored)(torch.cat([images[:2], 10 * images[:2]]))
    assert (scores["above_maxima"][:2] == 0).all() and (scores["above_maxima"][2:] < 0).all()
