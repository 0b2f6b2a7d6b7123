"""The data is checked before any work, through the real CLI: the class folders of an image-folder copy by name (a
label is the sorted folder position, so other names would label silently wrong), and every numeric DataModule
argument at construction. Each case asserts exit status 2, the one ``error:`` line and that nothing is left on
disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_ood.data.cifar_files import CIFAR10_CLASSES, CIFAR100_CLASSES
from lightning_ood.data.folders import check_split_classes, class_folders, labelled_image_folder
from lightning_ood.errors import DataError
from tests.conftest import make_cifar_folder, shared_data
from tests.helpers import args, cli_error, nothing_left, one_line

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


RANDOM = ("--model.weights", "random")  # no checkpoint needed: every case stops before the network runs


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Generated image-folder copies: CIFAR-10 with ImageNet-style folder names, with one test folder renamed, with 7
    of the 10 classes, and CIFAR-100 with made-up names."""
    tmp = tmp_path_factory.mktemp("data_checks")
    wnids = make_cifar_folder(tmp / "wnids", classes=[f"n0144{i}" for i in range(10)], train=2, test=1)
    renamed = make_cifar_folder(tmp / "renamed", train=2, test=1)
    (renamed / "test" / "cat").rename(renamed / "test" / "kitty")
    seven = make_cifar_folder(tmp / "seven", classes=CIFAR10_CLASSES[:7], train=2, test=1)
    c100 = make_cifar_folder(tmp / "c100", classes=[f"c{i:03d}" for i in range(100)], train=1, test=1)
    return {"wnids": wnids, "renamed": renamed, "seven": seven, "c100": c100}


@pytest.fixture(scope="module")
def ok_root(tmp_path_factory) -> Path:
    """A correct CIFAR-10 copy: the ID data of the cases that refuse something else."""
    return make_cifar_folder(tmp_path_factory.mktemp("data_checks_ok"), train=2, test=1)


def refused(capsys, logs: Path, *cli_args: str) -> str:
    """The CLI's one ``error:`` line (exit status 2) for a run that must stop before writing anything."""
    err = cli_error(capsys, *cli_args)
    one_line(err)
    nothing_left(logs)
    return err


# ============================================================================================ class names


def test_cifar10_with_other_class_names_is_refused_by_name(roots, tmp_path, capsys):
    data = roots["wnids"]
    err = refused(capsys, tmp_path / "logs", "test", *args(tmp_path / "logs", data, *RANDOM))
    assert (
        f"error: CIFAR-10: the class folders of {data / 'train'} are not CIFAR-10's classes: unexpected n01440, "
        "n01441, n01442, n01443, n01444 and 5 more; missing airplane, automobile, bird, cat, deer and 5 more. Name the "
        "class folders after CIFAR-10's classes (airplane, automobile, bird and 7 more): a label is its folder's "
        "sorted position." in err
    )


def test_a_renamed_test_folder_is_refused_before_training(roots, tmp_path, capsys):
    data = roots["renamed"]
    fit = args(tmp_path / "logs", data, "--trainer.max_epochs", "1", "--checkpoint.dirpath", str(tmp_path / "ckpt"))
    err = refused(capsys, tmp_path / "logs", "fit", *fit)
    assert (
        f"error: CIFAR-10: the class folders of {data / 'test'} are not CIFAR-10's classes: unexpected kitty; missing "
        "cat." in err
    )
    nothing_left(tmp_path / "ckpt")


def test_a_renamed_test_folder_is_refused_by_test(roots, tmp_path, capsys):
    data = roots["renamed"]
    err = refused(capsys, tmp_path / "logs", "test", *args(tmp_path / "logs", data, *RANDOM))
    assert f"the class folders of {data / 'test'} are not CIFAR-10's classes: unexpected kitty; missing cat." in err


def test_missing_classes_are_named(roots, tmp_path, capsys):
    data = roots["seven"]
    err = refused(capsys, tmp_path / "logs", "test", *args(tmp_path / "logs", data, *RANDOM))
    assert (
        f"error: CIFAR-10: {data / 'train'} has 7 class folders but CIFAR-10 has 10 classes (missing horse, ship, "
        "truck)." in err
    )


def test_cifar100_with_other_class_names_is_refused_by_name(roots, tmp_path, capsys):
    data = roots["c100"]
    err = refused(capsys, tmp_path / "logs", "test", *args(tmp_path / "logs", data, "--data.dataset", "cifar100",
                                                            *RANDOM))  # fmt: skip
    assert (
        f"error: CIFAR-100: the class folders of {data / 'train'} are not CIFAR-100's classes: unexpected c000, c001, "
        "c002, c003, c004 and 95 more; missing apple, aquarium_fish, baby, bear, beaver and 95 more." in err
    )


def test_a_cifar_ood_set_is_checked_by_name_too(roots, ok_root, tmp_path, capsys):
    data = roots["c100"]
    ood = json.dumps([{"name": "cifar100", "root": str(data)}])
    err = refused(capsys, tmp_path / "logs", "test", *args(tmp_path / "logs", ok_root, "--data.ood", ood, *RANDOM))
    expected = f"error: CIFAR-100: the class folders of {data / 'train'} are not CIFAR-100's classes: unexpected c000"
    assert expected in err


def test_the_real_class_names_are_accepted(tmp_path):
    c100 = make_cifar_folder(tmp_path / "c100", classes=CIFAR100_CLASSES, train=1, test=1)
    train = labelled_image_folder(c100, "train", None, 100, "CIFAR-100", class_names=CIFAR100_CLASSES)
    assert train.classes == list(CIFAR100_CLASSES) and train.class_to_idx["worm"] == 99


def test_the_shared_cifar10_copy_is_accepted():
    root = shared_data("cifar10-jpeg")
    for split in ("train", "test"):
        check_split_classes(root, split, class_folders(root / split), "CIFAR-10", CIFAR10_CLASSES)


def test_any_image_folder_checks_test_against_train(tmp_path):
    root = make_cifar_folder(tmp_path / "mine", classes=["a", "b", "c"], train=1, test=1)
    assert labelled_image_folder(root, "train", None, 3, "Mine").classes == ["a", "b", "c"]
    shutil.move(root / "test" / "b", root / "test" / "x")
    for split in ("train", "test"):  # whichever split is read first
        with pytest.raises(DataError) as info:
            labelled_image_folder(root, split, None, 3, "Mine")
        assert str(info.value) == (
            f"Mine: the class folders of {root / 'test'} differ from those of {root / 'train'}: only in test/: x; "
            "only in train/: b. Both splits need the same class folders: a label is its folder's sorted position."
        )


# ============================================================================================ loader values


def data_args(logs: Path, data: Path, module: str, *extra: str) -> list[str]:
    """``args`` of tests/helpers.py with another DataModule (its own arguments only)."""
    cifar = args(logs, data, *RANDOM, *extra)
    if module == "CIFARDataModule":
        return cifar
    at = cifar.index("--data.root")
    return [*cifar[:1], module, *cifar[at + 2 :]]


@pytest.mark.parametrize(
    ("module", "extra", "message"),
    [
        ("CIFARDataModule", ["--data.eval_batch_size", "0"],
         "--data.init_args.eval_batch_size must be >= 1 or null (the training batch size), got 0."),
        ("CIFARDataModule", ["--data.eval_batch_size", "-8"],
         "--data.init_args.eval_batch_size must be >= 1 or null (the training batch size), got -8."),
        ("CIFARDataModule", ["--data.batch_size", "0"], "--data.init_args.batch_size must be >= 1, got 0."),
        ("CIFARDataModule", ["--data.batch_size", "-1"], "--data.init_args.batch_size must be >= 1, got -1."),
        ("CIFARDataModule", ["--data.num_workers", "-1"],
         "--data.init_args.num_workers must be >= 0 or null (one per core beyond the first, at most 8), got -1."),
        ("CIFARDataModule", ["--data.val_split", "-5"], "--data.init_args.val_split must be >= 0, got -5."),
        ("CIFARDataModule", ["--data.train_per_class", "0"],
         "--data.init_args.train_per_class must be >= 1 or null (all images), got 0."),
        ("CIFARDataModule", ["--data.ood", '[{"name": "gaussian_noise", "size": 0}]'],
         "--data.init_args.ood: the size of OOD set 'gaussian_noise' must be an integer >= 1, got 0."),
        ("CIFARDataModule", ["--data.ood", '[{"name": "uniform_noise", "label": "u", "size": -3}]'],
         "--data.init_args.ood: the size of OOD set 'u' must be an integer >= 1, got -3."),
        ("ImageNetDataModule", ["--data.image_size", "0"], "--data.init_args.image_size must be >= 1, got 0."),
        ("ImageNetDataModule", ["--data.resize_size", "200"],
         "--data.init_args.resize_size must be >= image_size (224), got 200."),
        ("SyntheticDataModule", ["--data.test_size", "0"], "--data.init_args.test_size must be >= 1, got 0."),
        ("SyntheticDataModule", ["--data.image_size", "-32"], "--data.init_args.image_size must be >= 1, got -32."),
        ("SyntheticDataModule", ["--data.num_classes", "0"], "--data.init_args.num_classes must be >= 1, got 0."),
        ("SyntheticDataModule", ["--data.train_size", "3"],
         "--data.init_args.train_size must be >= num_classes (10), got 3."),
        ("SyntheticDataModule", ["--data.ood_sizes", '{"noise": 0}'],
         "--data.init_args.ood_sizes.noise must be >= 1, got 0."),
        ("DemoDataModule", ["--data.id_classes", "1"], "--data.init_args.id_classes must be in [2, 9], got 1."),
        ("DemoDataModule", ["--data.test_fraction", "0"], "--data.init_args.test_fraction must be in (0, 1), got 0.0."),
    ],
)  # fmt: skip
def test_bad_loader_values_are_refused_at_construction(ok_root, tmp_path, capsys, module, extra, message):
    err = refused(capsys, tmp_path / "logs", "test", *data_args(tmp_path / "logs", ok_root, module, *extra))
    assert f"error: {message}" in err
