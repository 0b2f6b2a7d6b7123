"""Device and dtype follow the model, by construction.

A CPU-only machine cannot see a tensor left on the CPU while the network is on a GPU, so these tests move the model to
another dtype (``double()``, float64) or device (``meta``) after the statistics and the scorers are fitted, and check
that every tensor a scorer will touch moved with it; then they score float64 inputs through every scorer, and run the
test pass of the CLI in float64 (``--trainer.precision 64-true``), where the statistics are fitted on demand exactly as
on the GPU where `lightning-ood test` crashed.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_ood.data import SyntheticDataModule
from lightning_ood.module import OODClassifier
from lightning_ood.scoring.registry import GROUPS
from tests.helpers import QUICK_SETTINGS, scorer_mapping

# every registered method, FeatureNorm on a named block (NormRatio's choice is tested through the CLI below)
EVERY = {name: spec for name, spec in scorer_mapping(GROUPS["all"], QUICK_SETTINGS).items() if name != "featurenorm"}
EVERY["featurenorm"] = {"scorer": "featurenorm", "block": "layer2.0"}


def reachable_tensors(obj, seen=None, path="scorer"):
    """Every tensor held by ``obj``: its buffers and parameters, plain attributes, and what dicts, lists, tuples and
    plain objects (a Weibull fit) among them hold, recursively; the network parts a scorer merely reads (the
    backbone's BatchNorm) are included too: they must move as well."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, nn.Module):
        for name, tensor in [*obj.named_parameters(recurse=False), *obj.named_buffers(recurse=False)]:
            yield from reachable_tensors(tensor, seen, f"{path}.{name}")
        for name, child in obj.named_children():
            yield from reachable_tensors(child, seen, f"{path}.{name}")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
    else:
        return
    for key, value in items:
        if callable(value) and not isinstance(value, nn.Module | torch.Tensor):
            continue
        yield from reachable_tensors(value, seen, f"{path}.{key}")


def model_after_test(tmp_path, scorers) -> tuple[OODClassifier, SyntheticDataModule]:
    """A ResNet-20 whose statistics and scorers were fitted by a real ``trainer.test`` on the CPU."""
    torch.manual_seed(0)
    model = OODClassifier(backbone="resnet20", num_classes=4, scorers=scorers)
    for m in model.modules():  # a trained network's BatchNorm statistics, not the identity of a fresh one
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    dm = SyntheticDataModule(num_classes=4, train_size=80, test_size=24, ood_sizes={"noise": 16}, batch_size=16,
                             eval_batch_size=12, val_split=20)  # fmt: skip
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      inference_mode=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    return model, dm


@pytest.fixture(scope="module")
def every_scorer(tmp_path_factory):
    return model_after_test(tmp_path_factory.mktemp("device"), EVERY)


def test_every_fitted_tensor_follows_the_model_to_float64(every_scorer):
    model, _ = every_scorer
    assert list(model.scorers) == list(EVERY)
    model.double()
    for label, scorer in model.scorers.items():
        for path, tensor in reachable_tensors(scorer, path=label):
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float64, f"{path} stayed {tensor.dtype} after model.double()"
    model.float()


def test_every_fitted_tensor_and_the_statistics_follow_the_model_to_another_device(every_scorer):
    model, _ = every_scorer  # the last test of the fixture: meta tensors hold no values
    model.to("meta")
    for label, scorer in model.scorers.items():
        for path, tensor in reachable_tensors(scorer, path=label):
            assert tensor.device.type == "meta", f"{path} stayed on {tensor.device} after model.to('meta')"
    statistics = list(reachable_tensors(model.ood_statistics, path="ood_statistics"))
    assert statistics and all(t.device.type == "meta" for _, t in statistics), [
        p for p, t in statistics if t.device.type != "meta"
    ]
    assert model.ood_statistics.class_means.dtype == torch.float64  # the sums keep their own precision


def test_every_scorer_scores_float64_inputs_of_a_float64_model(tmp_path):
    model, dm = model_after_test(tmp_path, EVERY)
    x = dm.test_sets[dm.id_name].tensors[0][:6]
    model.eval()
    logits32, scores32 = model.engine(x)
    model.double()
    logits, scores = model.engine(x.double())
    assert logits.dtype == torch.float64 and list(scores) == list(EVERY)
    for label, values in scores.items():
        assert values.shape == (6,) and torch.isfinite(values).all(), label
        # the same scores as in float32, up to float32 rounding of what each method computes; NAC's states bin the
        # position sums of the layers' loss gradients, whose cancellations float32 resolves to ~0.5% here: a few states
        # of its 500-bin layers land in the neighbouring bin (each moves the score by up to 1 / 64 on this network)
        tolerance = 5e-2 if label == "nac" else 2e-3
        torch.testing.assert_close(values.double(), scores32[label].double(), rtol=tolerance, atol=tolerance, msg=label)
    torch.testing.assert_close(logits, logits32.double(), rtol=1e-4, atol=1e-4)


# The test pass in float64 (--trainer.precision 64-true) with every scorer and the statistics and reference images
# computed at its start (a checkpoint without them): tests/ddp/test_cli.py runs it, once per process count.
