"""Shared fixtures: generated image data in the real on-disk layouts, paths to the optional shared data, the
scorers' toy problems (``p``, ``prob``) and the CLI runs of the reliability tests (``setup``, ``case``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_ood.statistics import FeatureStatistics
from tests.helpers import random_problem, run_cli

# ----------------------------------------------------------------------------------------------- generated image data

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_OOD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_class_images(folder: Path, label: int, count: int, size: int, rng: np.random.Generator) -> None:
    """Images whose mean colour depends on the class (a learnable signal) plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
    for i in range(count):
        pixels = base + rng.normal(0, 30, size=(size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def make_cifar_folder(root: Path, classes=CIFAR10_CLASSES, train: int = 6, test: int = 3, size: int = 32) -> Path:
    """A CIFAR-style image-folder copy: ``root/{train,test}/<class>/NNNN.png``."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        write_class_images(root / "train" / name, label, train, size, rng)
        write_class_images(root / "test" / name, label, test, size, rng)
    return root


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """A tiny generated CIFAR-10 image-folder copy (10 classes, 6 train and 3 test images each)."""
    return make_cifar_folder(tmp_path_factory.mktemp("cifar10-generated"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytest.mark.usefixtures("one_thread")``): batches of one or two
    ImageNet-sized images gain nothing from more, and OpenMP threads spinning against other work on a 2-core machine
    made those files several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


# ------------------------------------------------------------------------------------------ the scorers' toy problems


def toy_features(L: int = 12, C: int = 5, N: int = 400):
    """The scorer tests' toy problem, from one seeded generator: labels ``(N,)``, training features ``(N, L)`` around
    ``C`` random centres with a dead unit (unit 3) and tied rows (50-59 repeat 40-49), a head that classifies most of
    them right, and test features ``near`` the centres and ``far`` from them (30 each). Each test file adds its own
    cases (float16 rounding, zero rows, copies of training rows)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % C
    centres = torch.rand(C, L, generator=g) * 3
    train = (centres[labels] + torch.randn(N, L, generator=g)).relu()
    train[:, 3] = 0.0  # a dead unit
    train[50:60] = train[40:50]  # ties
    head = nn.Linear(L, C)
    with torch.no_grad():
        head.weight.copy_(centres - 0.8 * centres.mean(0))  # full rank: pinv(W) is well conditioned
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
    near = (centres[torch.arange(30) % C] + torch.randn(30, L, generator=g)).relu()
    far = torch.rand(30, L, generator=g) * 6
    return labels, train, head, near, far


@pytest.fixture(scope="module")
def prob():
    return random_problem(0)


@pytest.fixture(scope="module")
def p():
    """Training features exactly representable in float16 (so the bank equals them), ties (repeated rows) and
    zeros (dead units), a head that classifies most of them right, and test features near and far."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    train = train.half().float()
    test = torch.cat([near, far, train[:5]])
    with torch.no_grad():
        logits, train_logits = head(test), head(train)
    stats = FeatureStatistics.from_features(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, N=N, train=train, labels=labels, head=head, test=test, logits=logits,
                           train_logits=train_logits, stats=stats, W=head.weight.detach().double().numpy(),
                           b=head.bias.detach().double().numpy(), X=train.double().numpy(), T=test.double().numpy(),
                           y=labels.numpy())  # fmt: skip


# ----------------------------------------------- a 1-epoch run that the bad-input tests share (cli/ and reliability/)


def fit_one_epoch(tmp: Path, test: int) -> tuple[Path, Path]:
    """A generated CIFAR folder (4 training and ``test`` test images per class) under ``tmp`` and a 1-epoch ResNet-20
    fitted on it through the CLI, with statistics: ``(data folder, last.ckpt)``."""
    data = make_cifar_folder(tmp / "data", train=4, test=test)
    run_cli("fit", "--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--data.batch_size", "20", "--model.backbone", "resnet20", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "fitlogs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"))  # fmt: skip
    return data, tmp / "ckpt" / "last.ckpt"


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, *fit_one_epoch(tmp, test=4)


@pytest.fixture
def case(setup, tmp_path):
    """A fresh folder per test with a link to the shared data and checkpoint."""
    tmp, data, ckpt = setup
    shutil.rmtree(tmp / "logs", ignore_errors=True)
    return tmp, data, ckpt, tmp_path
