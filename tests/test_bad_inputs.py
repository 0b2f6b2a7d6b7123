"""Every bad input ends in one clear message, exit status 2, and no results or checkpoints half-written."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from tests.conftest import make_cifar_folder
from tests.test_cli import cli_error, run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    data = make_cifar_folder(tmp / "data", train=4, test=4)
    run_cli("fit", "--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--data.batch_size", "20", "--model.backbone", "resnet20", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "fitlogs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"))  # fmt: skip
    return tmp, data, tmp / "ckpt" / "last.ckpt"


def args(tmp, data, *extra, workers="0"):
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", workers,
            "--model.backbone", "resnet20", "--model.scorers", "[msp, fmls]", "--trainer.enable_progress_bar", "false",
            "--data.ood", '[{"name": "gaussian_noise", "size": 10}]',
            "--trainer.logger.init_args.save_dir", str(tmp / "logs"), *extra]  # fmt: skip


def no_results(tmp):
    """Nothing half-written: no result files, no temporary files, no new checkpoints."""
    assert not list((tmp / "logs").rglob("ood_results.*")) if (tmp / "logs").exists() else True
    assert not list(tmp.rglob("*.tmp"))
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["epoch000.ckpt", "last.ckpt"]


@pytest.fixture
def case(setup, tmp_path):
    """A fresh folder per test with a link to the shared data and checkpoint."""
    tmp, data, ckpt = setup
    shutil.rmtree(tmp / "logs", ignore_errors=True)
    return tmp, data, ckpt, tmp_path


def test_missing_checkpoint(case, capsys):
    tmp, data, _, scratch = case
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(scratch / "nope.ckpt")))
    assert f"error: Checkpoint {scratch / 'nope.ckpt'} does not exist." in err
    no_results(tmp)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_checkpoint(case, capsys, how):
    tmp, data, ckpt, scratch = case
    bad = scratch / "bad.ckpt"
    bad.write_bytes(os.urandom(4096) if how == "garbage" else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(bad)))
    assert f"error: Checkpoint {bad} cannot be read" in err and "truncated, corrupt or not a PyTorch checkpoint" in err
    no_results(tmp)


def test_not_a_lightning_checkpoint(case, capsys):
    tmp, data, _, scratch = case
    torch.save({"weights": torch.ones(3)}, scratch / "plain.pt")
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(scratch / "plain.pt")))
    assert "is not a Lightning checkpoint (it has no 'state_dict')" in err
    no_results(tmp)


def test_checkpoint_of_another_backbone(case, capsys):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--model.backbone", "resnet18"))
    assert "The checkpoint holds a 'resnet20' backbone but model.backbone is 'resnet18'; set --model.backbone " \
           "resnet20." in err  # fmt: skip
    no_results(tmp)


def test_checkpoint_without_statistics_and_no_training_data(case, capsys):
    tmp, data, ckpt, scratch = case
    bare = scratch / "bare.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, bare)
    test_only = scratch / "test_only"
    shutil.copytree(data / "test", test_only / "test")
    err = cli_error(capsys, "test", *args(tmp, test_only, "--ckpt_path", str(bare)))
    assert "The OOD statistics are not in this checkpoint and computing them needs the training images, which are " \
           f"not available: CIFAR-10: missing folder {test_only / 'train'}" in err  # fmt: skip
    no_results(tmp)


def test_empty_ood_set(case, capsys):
    tmp, data, ckpt, scratch = case
    (scratch / "empty").mkdir()
    ood = json.dumps([{"name": "folder", "root": str(scratch / "empty")}])
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    assert f"error: OOD set 'folder' is empty: no images under {scratch / 'empty'}." in err
    empty_list = scratch / "list.txt"
    empty_list.write_text("\n")
    ood = json.dumps([{"name": "image_list", "root": str(scratch), "image_list": str(empty_list)}])
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    assert f"image_list: image list {empty_list} is empty." in err
    no_results(tmp)


def corrupt_folder(scratch):
    folder = scratch / "mine"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (50 * i, 0, 0)).save(folder / f"ok_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return folder


def test_undecodable_image_is_a_clear_error(case, capsys):
    tmp, data, ckpt, scratch = case
    ood = json.dumps([{"name": "folder", "root": str(corrupt_folder(scratch))}])
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood, workers="1"))
    assert f"error: Cannot decode image {scratch / 'mine' / 'broken.png'}" in err
    assert "skip undecodable images of this set with bad_images: skip" in err
    assert "Original Traceback" not in err
    no_results(tmp)


def test_undecodable_images_skipped_with_a_count(case):
    tmp, data, ckpt, scratch = case
    ood = json.dumps([{"name": "folder", "root": str(corrupt_folder(scratch)), "bad_images": "skip"}])
    with pytest.warns(UserWarning, match="skipped 1 undecodable image"):
        run_cli("test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    (results,) = (tmp / "logs").rglob("ood_results.json")
    report = json.loads(results.read_text())
    assert report["skipped_images"] == {"folder": 1} and report["num_images"]["folder"] == 3
    assert "Undecodable images left out: folder: 1" in results.with_suffix(".md").read_text()


def poisoned_checkpoint(ckpt, path, trust_statistics: bool):
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    if trust_statistics:  # statistics of unknown weights are used as they are
        checkpoint["ood_statistics"]["weights"] = ""
    torch.save(checkpoint, path)
    return path


def test_nan_features_are_reported_not_scored(case, capsys):
    tmp, data, ckpt, scratch = case
    poisoned = poisoned_checkpoint(ckpt, scratch / "nan.ckpt", trust_statistics=True)
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(poisoned)))
    assert "NaN or infinite penultimate features for 40 of 'cifar10', 10 of 'gaussian_noise' images" in err
    assert "No results were written." in err
    no_results(tmp)


def test_nan_features_stop_the_statistics(case, capsys, caplog):
    tmp, data, ckpt, scratch = case
    poisoned = poisoned_checkpoint(ckpt, scratch / "nan.ckpt", trust_statistics=False)
    with caplog.at_level("INFO"):
        err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(poisoned)))
    assert any("OOD statistics were fitted on other weights" in r.getMessage() for r in caplog.records)
    assert "NaN or infinite penultimate features on training images [0, 1, 2, 3, 4]" in err
    no_results(tmp)


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        ("[fmlz]", "Unknown scorer 'fmlz'. Choose one of: adascale_a, adascale_l, ash_b, ash_b_map,"),
        ('{"fmls": {"percentile": 120}}', "percentile must be a percentile in [0, 100], got 120."),
        ('{"fmls": {"percentile": -5}}', "percentile must be a percentile in [0, 100], got -5."),
        ('{"fmls": {"clip": -0.5}}', "clip must be >= 0, got -0.5."),
        ('{"react": {"percentile": 101}}', "percentile must be a percentile in [0, 100], got 101."),
        ('{"fmls": {"lambda": 1.0}}', "Scorer 'fmls' has no hyperparameter 'lambda'. Valid: clip, clip_percentile,"),
    ],
)
def test_invalid_scorers(case, capsys, scorers, message):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--model.scorers", scorers))
    assert f"error: {message}" in err
    no_results(tmp)


def test_unknown_ood_set(case, capsys):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", "[svhm]"))
    assert "error: Unknown OOD set 'svhm'. Choose one of: cifar10, cifar100, fashion_mnist," in err
    no_results(tmp)


def test_download_into_a_read_only_root(case, capsys, monkeypatch):
    tmp, _, _, scratch = case
    read_only = scratch / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setattr("lightning_ood.data.cifar_files.is_writable", lambda path: str(path) != str(read_only))
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--data.root", str(read_only / "cifar10"),
                    "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
                    "--checkpoint.dirpath", str(scratch / "ckpt"))  # fmt: skip
    assert f"error: CIFAR-10: cannot download into {read_only / 'cifar10'}: {read_only} is not writable." in err
    assert not (scratch / "ckpt").exists() and list(read_only.iterdir()) == []
