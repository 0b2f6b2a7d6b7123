"""Every bad input ends in one clear message, exit status 2, and no results or checkpoints half-written."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, make_cifar_folder
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


# ============================================================================================ bad input, round 4
def test_a_file_as_the_data_root_is_one_line(case, capsys):
    tmp, _, _, scratch = case
    (scratch / "afile").write_text("not a folder")
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--data.root", str(scratch / "afile" / "cifar10"),
                    "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
                    "--checkpoint.dirpath", str(scratch / "ckpt"))  # fmt: skip
    assert f"error: CIFAR-10: cannot download into {scratch / 'afile' / 'cifar10'}: {scratch / 'afile'} is a file, " \
           "not a folder. Give a folder as the data root (--data.root" in err  # fmt: skip
    assert (scratch / "afile").read_text() == "not a folder"


SEED_RANGE = "must be an integer in 0..4294967295 (2^32 - 1)"


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("test", ["--seed_everything", "4294967296"],
         f"--seed_everything {SEED_RANGE}, true (a random seed) or false (no seeding), got 4294967296."),
        ("test", ["--seed_everything", "-1"], f"--seed_everything {SEED_RANGE}, true (a random seed) or false"),
        ("test", ["--data.val_seed", "4294967296"], f"--data.init_args.val_seed {SEED_RANGE}, got 4294967296."),
        ("validate", ["--data.val_split", "5", "--data.val_seed", "-3"], f"--data.init_args.val_seed {SEED_RANGE}"),
        ("test", ["--data.ood", '[{"name": "gaussian_noise", "size": 10, "seed": 18446744073709551616}]'],
         f"--data.init_args.ood: the seed of OOD set 'gaussian_noise' {SEED_RANGE}, got 18446744073709551616."),
        ("test", ["--data.ood", '[{"name": "uniform_noise", "label": "u", "seed": -1}]'],
         f"--data.init_args.ood: the seed of OOD set 'u' {SEED_RANGE}, got -1."),
        ("tune", ["--seed", "4294967296"], f"tune --seed {SEED_RANGE}, got 4294967296."),
        ("tune", ["--validation", '{"name": "gaussian_noise", "seed": -5}'],
         f"tune --validation: the seed of OOD set 'gaussian_noise' {SEED_RANGE}, got -5."),
        ("tune", ["--scorer", "featurenorm", "--settings", '{"normratio_seed": -1}'],
         f"normratio_seed {SEED_RANGE}, got -1."),
    ],
    ids=["seed_everything", "negative seed_everything", "val_seed", "negative val_seed", "ood seed",
         "negative ood seed", "tune seed", "tune validation seed", "featurenorm's normratio seed"],
)  # fmt: skip
def test_seeds_outside_0_to_2_32_are_one_line(case, capsys, command, extra, message):
    tmp, data, ckpt, scratch = case
    cache = ["--cache_dir", str(scratch / "cache")] if command == "tune" else []
    err = cli_error(capsys, command, *args(tmp, data, "--ckpt_path", str(ckpt), *cache, *extra))
    assert f"error: {message}" in err
    assert not (scratch / "cache").exists()
    no_results(tmp)


@pytest.mark.parametrize("module", ["SyntheticDataModule", "DemoDataModule"])
def test_the_seed_of_a_generated_data_module_is_checked(case, capsys, module):
    tmp, _, _, _ = case
    err = cli_error(capsys, "fit", "--data", module, "--data.seed", "-1", "--trainer.logger.init_args.save_dir",
                    str(tmp / "logs"))  # fmt: skip
    assert f"error: --data.init_args.seed {SEED_RANGE}, got -1." in err


def without_statistics(ckpt, path):
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("test", "--model.statistics_cache", "--model.statistics_cache"),
        ("test", "--data.decoded_cache", "--data.init_args.decoded_cache"),
        ("tune", "--cache_dir", "tune --cache_dir"),
        ("sweep", "--cache_dir", "sweep --cache_dir"),
    ],
)
@pytest.mark.parametrize("below", [False, True], ids=["a file", "under a file"])
def test_a_cache_folder_that_is_a_file_is_one_line(case, capsys, command, flag, shown, below):
    tmp, data, ckpt, scratch = case
    afile = scratch / "afile"
    afile.write_text("someone's file")
    bare = without_statistics(ckpt, scratch / "bare.ckpt")  # test computes statistics: the statistics cache is used
    folder = afile / "cache" if below else afile
    err = cli_error(capsys, command, *args(tmp, data, "--ckpt_path", str(bare), flag, str(folder)))
    assert f"error: {shown}: cannot write into {folder}: {afile} is a file, not a folder. Choose another folder " \
           f"({shown})." in err  # fmt: skip
    assert afile.read_text() == "someone's file"
    no_results(tmp)


@pytest.fixture
def unwritable(monkeypatch):
    """As root every folder is writable: the writability check sees ``folders["permissions"]`` as not writable,
    ``folders["read-only"]`` on a read-only file system and ``folders["full"]`` on a full disk."""
    from pathlib import Path

    folders = {"permissions": [], "read-only": [], "full": []}
    real_access, real_free = os.access, io_module().free_bytes

    def access(path, mode, *a, **k):
        return not (mode & os.W_OK and Path(path) in folders["permissions"]) and real_access(path, mode, *a, **k)

    monkeypatch.setattr("lightning_ood.io.os.access", access)
    monkeypatch.setattr("lightning_ood.io.read_only_file_system", lambda path: Path(path) in folders["read-only"])
    monkeypatch.setattr("lightning_ood.io.free_bytes", lambda path: 0 if Path(path) in folders["full"] else
                        real_free(path))  # fmt: skip
    return folders


def io_module():
    import lightning_ood.io

    return lightning_ood.io


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        ("permissions", "is not writable (no write permission). Choose another folder, or fix its permissions"),
        ("read-only", "is on a read-only file system. Choose a folder on a writable disk"),
        ("full", "is full (0 bytes free). Free some space, or choose another disk"),
    ],
)
def test_an_unwritable_cache_folder_is_refused_before_any_work_with_its_cause(case, capsys, unwritable, cause, reason):
    tmp, data, ckpt, scratch = case
    folder = scratch / "caches"
    folder.mkdir()
    unwritable[cause].append(folder)
    bare = without_statistics(ckpt, scratch / "bare.ckpt")
    cases = [
        ("test", ["--ckpt_path", str(bare), "--model.statistics_cache", str(folder / "stats")],
         "--model.statistics_cache"),
        ("test", ["--ckpt_path", str(ckpt), "--data.decoded_cache", str(folder)], "--data.init_args.decoded_cache"),
        ("tune", ["--ckpt_path", str(ckpt), "--cache_dir", str(folder / "features")], "tune --cache_dir"),
        ("sweep", ["--ckpt_path", str(ckpt), "--cache_dir", str(folder / "features")], "sweep --cache_dir"),
    ]  # fmt: skip
    for command, extra, shown in cases:
        with pytest.raises(SystemExit) as exit_info:
            from tests.test_cli import run_cli as run

            run(command, *args(tmp, data, *extra))
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert exit_info.value.code == 2 and "Traceback" not in err
        where = folder if cause != "full" else f"the disk holding {folder}"
        assert f"error: {shown}: cannot write into" in err and f"{where} {reason} ({shown})." in err
        assert "Free some space" not in err or cause == "full"
        # before any work: no image decoded, no statistics computed, no feature extracted
        assert "computing them" not in captured.out + captured.err and "Decoding" not in captured.out + captured.err
        assert list(folder.iterdir()) == []
        no_results(tmp)


def test_a_read_only_disk_at_write_time_is_not_called_full(case, capsys, monkeypatch):
    import errno

    tmp, data, ckpt, _ = case

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("lightning_ood.io.os.fsync", read_only)
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt)))
    assert "ood_results.md: Read-only file system. Choose a folder on a writable disk." in err
    assert "Free some space" not in err


def test_a_cache_entry_under_the_checksum_file_of_another_is_recomputed(case):
    tmp, data, ckpt, scratch = case
    cache = scratch / "cache"
    sweep = args(tmp, data, "--ckpt_path", str(ckpt), "--cache_dir", str(cache), "--values",
                 '{"clip_percentile": [50, 90], "percentile": [0, 60]}')  # fmt: skip
    run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "clean")
    (id_entry,) = cache.glob("cifar10-*.pt")
    (noise_entry,) = cache.glob("gaussian_noise-*.pt")
    for suffix in (".pt", ".json"):  # a consistent pair, of the noise images, under the ID test set's name
        shutil.copy(noise_entry.with_suffix(suffix), id_entry.with_suffix(suffix))
    with pytest.warns(UserWarning, match=f"Cache entry {id_entry}: its checksum file {id_entry.stem}.json belongs to "
                                         f"another entry \\(name 'gaussian_noise'"):  # fmt: skip
        run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "swapped")
    clean, again = ((tmp / "logs" / "lightning_ood" / v / "sensitivity.csv").read_text() for v in ("clean", "swapped"))
    assert clean == again
    assert json.loads(id_entry.with_suffix(".json").read_text())["name"] == "cifar10"


def image_list_set(root, listing):
    return json.dumps([{"name": "image_list", "root": str(root), "image_list": str(listing)}])


def test_an_image_list_may_not_leave_its_root(case, capsys):
    tmp, data, ckpt, scratch = case
    root = corrupt_folder(scratch)  # mine/ok_0.png .. ok_2.png (and broken.png)
    outside = scratch / "outside.png"
    Image.new("RGB", (40, 40)).save(outside)
    (root / "link.png").symlink_to(outside)
    listing = scratch / "list.txt"
    listing.write_text(f"ok_0.png 0\n../outside.png 0\n{outside} 0\nlink.png 0\nok_1.png 0\n")
    ood = image_list_set(root, listing)
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    assert (
        f"error: image_list: 3 of 5 entries of the image list {listing} lie outside its root {root} (first: line "
        f"2: ../outside.png -> {outside}; line 3: {outside} -> {outside}; line 4: link.png -> {outside})" in err
    )
    assert "no '..', no absolute paths, no symbolic links leading out" in err  # fmt: skip
    no_results(tmp)


def test_an_image_list_may_not_repeat_an_image(case, capsys):
    tmp, data, ckpt, scratch = case
    root = corrupt_folder(scratch)
    listing = scratch / "list.txt"
    listing.write_text("ok_0.png -1\nok_1.png -1\nok_0.png -1\n./ok_1.png -1\nok_2.png -1\n")
    ood = image_list_set(root, listing)
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    assert (
        f"error: image_list: 2 of the 5 lines of the image list {listing} repeat an image of an earlier line "
        "(3 distinct images; first: line 3 repeats line 1: ok_0.png; line 4 repeats line 2: ./ok_1.png)" in err
    )
    no_results(tmp)


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_an_ood_set_may_not_hold_the_id_test_images(case, capsys, pipeline):
    tmp, data, ckpt, scratch = case
    listing = scratch / "list.txt"
    listing.write_text("airplane/0000.png\nbird/0003.png\n")
    ood = image_list_set(data / "test", listing)
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood, "--data.pipeline",
                                          pipeline))  # fmt: skip
    assert "error: OOD set 'image_list' holds 2 of the 40 cifar10 test images (first: " \
           f"{data / 'test' / 'airplane' / '0000.png'}, {data / 'test' / 'bird' / '0003.png'}): they would be scored " \
           "as ID and as OOD at once." in err  # fmt: skip
    folder = json.dumps([{"name": "folder", "label": "mine", "root": str(data / "test" / "cat")}])
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", folder))
    assert "error: OOD set 'mine' holds 4 of the 40 cifar10 test images" in err
    no_results(tmp)


def test_validate_prints_the_held_out_accuracy(case, capsys):
    tmp, data, ckpt, _ = case
    run_cli("validate", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.val_split", "10", "--data.val_seed", "3"))
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"Held-out accuracy on cifar10: \d+\.\d\d% \(10 training images held out by "
                     r"--data.init_args.val_split, seed 3\)\.", out), out  # fmt: skip


def test_tune_suggests_a_test_command_that_runs_as_printed(case, caplog):
    tmp, data, ckpt, scratch = case
    with caplog.at_level("INFO"):
        run_cli("tune", *args(tmp, data, "--model.weights", str(ckpt), "--cache_dir", str(scratch / "cache"),
                              "--grid", '{"percentile": [60], "clip_percentile": [90]}'))  # fmt: skip
    (line,) = [r.getMessage() for r in caplog.records if "Test with: " in r.getMessage()]
    command = shlex.split(line.split("Test with: ")[1])
    assert command[:2] == ["lightning-ood", "test"] and "<config>" not in line
    run_cli(*command[1:])
    (results,) = (tmp / "logs").rglob("ood_results.json")
    report = json.loads(results.read_text())
    assert report["provenance"]["weights"] == str(ckpt) and list(report["metrics"]) == ["msp", "fmls"]
    assert report["provenance"]["scorers"]["fmls"]["percentile"] == 60  # the selected setting


def test_fit_prints_no_weights_only_message(tmp_path):
    """Lightning's "`weights_only` was not set, defaulting to `False`" after a fit reads like an unsafe load (it came
    from the statistics callback's save); a fit's whole output, as a user sees it, has none."""
    data = make_cifar_folder(tmp_path / "data", train=2, test=1)
    command = [sys.executable, "-m", "lightning_ood", "fit", "--data", "CIFARDataModule", "--data.root", str(data),
               "--data.num_workers", "0", "--data.batch_size", "20", "--model.backbone", "resnet20",
               "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--checkpoint.dirpath",
               str(tmp_path / "ckpt")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "with the OOD statistics" in output  # the save that the message came with
    assert "weights_only" not in output


BILLION_LAUGHS = "\n".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]"]
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
)


@pytest.mark.parametrize("how", ["-c", "--config=", "value"])
def test_a_billion_laughs_config_ends_fast_with_a_short_message(case, capsys, how):
    tmp, _, _, scratch = case
    bomb = scratch / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS + "\ntrainer:\n  max_epochs: *i\n")  # 9^9 = 387,420,489 "lol"s: gigabytes
    assert bomb.stat().st_size < 1000
    where = {"-c": ["-c", str(bomb)], "--config=": [f"--config={bomb}"],
             "value": ["--trainer.max_epochs", "{" + BILLION_LAUGHS.replace("\n", ", ") + "}"]}[how]  # fmt: skip
    start = time.perf_counter()
    err = cli_error(capsys, "fit", *where, "--trainer.logger.init_args.save_dir", str(tmp / "logs"))
    assert time.perf_counter() - start < 10
    assert len(err) < 600
    expands = r"expands to [\d,]{11,} values \([\d,]{13,} characters\) once its aliases \(\*name\) are expanded"
    assert re.search(expands + "; more than 100,000 values or 4,000,000 characters is refused", err), err
    if how != "value":
        assert f"error: {bomb}: The YAML expands to" in err


def test_an_alias_inside_its_own_anchor_is_refused(case, capsys):
    tmp, _, _, scratch = case
    loop = scratch / "loop.yaml"
    loop.write_text("model:\n  milestones: &m [1, *m]\n")
    err = cli_error(capsys, "fit", "-c", str(loop), "--trainer.logger.init_args.save_dir", str(tmp / "logs"))
    assert f"error: {loop}: The YAML holds an alias inside its own anchor (&name ... *name), an endless value." in err


def test_a_long_value_in_an_error_is_cut_with_a_count(case, capsys):
    tmp, _, _, _ = case
    long_list = "[" + ", ".join(["12345"] * 20_000) + "]"  # under the size limits: jsonargparse prints it back
    err = cli_error(capsys, "fit", "--trainer.max_epochs", long_list, "--trainer.logger.init_args.save_dir",
                    str(tmp / "logs"))  # fmt: skip
    assert err.startswith("error: ") and "max_epochs" in err
    assert re.search(r"… \([\d,]+ more characters\)", err) and len(err) < 6000


@pytest.mark.parametrize("scorer", ["mahalanobis", "rmds_pp"])
def test_a_degenerate_fit_is_refused_naming_the_scorer(case, capsys, scorer):
    """One training image per class (real statistics through the CLI): the within-class covariance is zero, and its
    pseudo-inverse would score a constant (AUROC 50) or rounding noise (a result that changes with the batch size):
    refused before any image is scored, naming the scorer, the images it had and what it needs."""
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.train_per_class", "1",
                                          "--model.scorers", f"[msp, {scorer}]"))  # fmt: skip
    assert err.startswith(
        f"error: {scorer} cannot be fitted: the within-class covariance of its 10 training images (10 classes, one "
        f"image each) is zero up to rounding: it needs two different images of one class at least (11 images or more)"
    ), err
    no_results(tmp)
