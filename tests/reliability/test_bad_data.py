"""Bad data through the real CLI: missing, corrupt or undecodable images, decompression bombs, 16-bit images, empty
or unknown OOD sets, image lists leaving their root, OOD sets holding ID test images. Each ends in one clear
message, exit status 2, and nothing half-written (or is skipped and counted where asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import args, case_args, cli_error, one_line, quiet, run_cli
from tests.reliability.conftest import no_results, only_run_records


def test_missing_data(capsys, tmp_path):
    err = cli_error(
        capsys, "fit", "--data", "CIFARDataModule", "--data.root", str(tmp_path / "none"), "--data.download", "false",
        *quiet(tmp_path),
    )  # fmt: skip
    assert f"error: CIFAR-10 not found under {tmp_path / 'none'}" in err
    assert not (tmp_path / "ckpt").exists()


def broken(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return path


def copy_folder(data: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(data, target)
    return target


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_corrupt_id_test_image_is_named_or_skipped(trained, tmp_path, capsys):
    data, ckpt = trained
    copy = copy_folder(data, tmp_path / "data")
    bad = broken(copy / "test" / "cat" / "0001.png")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", copy, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert f"Cannot decode image {bad}" in err and "bad_images: skip" in err
    only_run_records(tmp_path / "logs")
    run_cli("test", *args(tmp_path / "logs", copy, "--ckpt_path", str(ckpt), "--data.bad_images", "skip"))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    report = json.loads(result.read_text())
    assert report["skipped_images"] == {"cifar10": 1} and report["num_images"]["cifar10"] == 29


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_corrupt_training_image_is_named(trained, tmp_path, capsys):
    data, _ = trained
    copy = copy_folder(data, tmp_path / "data")
    bad = broken(copy / "train" / "dog" / "0002.png")
    err = cli_error(capsys, "fit", *args(tmp_path / "logs", copy, "--trainer.max_epochs", "1",
                                         "--checkpoint.dirpath", str(tmp_path / "ckpt")))  # fmt: skip
    one_line(err)
    assert f"Cannot decode image {bad}" in err
    only_run_records(tmp_path / "logs")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_image_over_the_decompression_bomb_limit(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # a 100 x 100 image is then a "bomb" (over 2x the limit)
    folder = tmp_path / "ood"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    Image.new("RGB", (100, 100)).save(folder / "huge.png")
    ood = json.dumps([{"name": "folder", "root": str(folder)}])
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    one_line(err)
    assert f"Image {folder / 'huge.png'} is larger than Pillow's decompression-bomb limit" in err
    ood = json.dumps([{"name": "folder", "root": str(folder), "bad_images": "skip"}])
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    assert json.loads(result.read_text())["skipped_images"] == {"folder": 1}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_16_bit_png_keeps_its_brightness(tmp_path):
    from lightning_ood.data.images import decode_image

    gradient = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")  # uint16: mode I;16
    opened = Image.open(tmp_path / "grey16.png")
    assert opened.mode in ("I;16", "I")  # Pillow's own convert("RGB") would clip this to 255
    rgb = np.asarray(decode_image(tmp_path / "grey16.png"), dtype=np.float64) / 255
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 0.5) < 0.01
    np.testing.assert_allclose(rgb[0, :, 0], np.round(np.linspace(0, 65535, 64) / 257) / 255, atol=1 / 255)
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tiff")  # float32: mode F
    from lightning_ood.errors import DataError

    with pytest.raises(DataError, match="32-bit floating-point image"):
        decode_image(tmp_path / "float.tiff")


def test_empty_ood_set(case, capsys):
    tmp, data, ckpt, scratch = case
    (scratch / "empty").mkdir()
    ood = json.dumps([{"name": "folder", "root": str(scratch / "empty")}])
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    assert f"error: OOD set 'folder' is empty: no images under {scratch / 'empty'}." in err
    empty_list = scratch / "list.txt"
    empty_list.write_text("\n")
    ood = json.dumps([{"name": "image_list", "root": str(scratch), "image_list": str(empty_list)}])
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
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
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood, workers="1"))
    assert f"error: Cannot decode image {scratch / 'mine' / 'broken.png'}" in err
    assert "skip undecodable images of this set with bad_images: skip" in err
    assert "Original Traceback" not in err
    no_results(tmp)


def test_undecodable_images_skipped_with_a_count(case):
    tmp, data, ckpt, scratch = case
    ood = json.dumps([{"name": "folder", "root": str(corrupt_folder(scratch)), "bad_images": "skip"}])
    with pytest.warns(UserWarning, match="skipped 1 undecodable image"):
        run_cli("test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    (results,) = (tmp / "logs").rglob("ood_results.json")
    report = json.loads(results.read_text())
    assert report["skipped_images"] == {"folder": 1} and report["num_images"]["folder"] == 3
    assert "Undecodable images left out: folder: 1" in results.with_suffix(".md").read_text()


def test_unknown_ood_set(case, capsys):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", "[svhm]"))
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


def test_a_file_as_the_data_root_is_one_line(case, capsys):
    tmp, _, _, scratch = case
    (scratch / "afile").write_text("not a folder")
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--data.root", str(scratch / "afile" / "cifar10"),
                    "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
                    "--checkpoint.dirpath", str(scratch / "ckpt"))  # fmt: skip
    assert f"error: CIFAR-10: cannot download into {scratch / 'afile' / 'cifar10'}: {scratch / 'afile'} is a file, " \
           "not a folder. Give a folder as the data root (--data.root" in err  # fmt: skip
    assert (scratch / "afile").read_text() == "not a folder"


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
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
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
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood))
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
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", ood,
                                               "--data.pipeline", pipeline))  # fmt: skip
    assert "error: OOD set 'image_list' holds 2 of the 40 cifar10 test images (first: " \
           f"{data / 'test' / 'airplane' / '0000.png'}, {data / 'test' / 'bird' / '0003.png'}): they would be scored " \
           "as ID and as OOD at once." in err  # fmt: skip
    folder = json.dumps([{"name": "folder", "label": "mine", "root": str(data / "test" / "cat")}])
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.ood", folder))
    assert "error: OOD set 'mine' holds 4 of the 40 cifar10 test images" in err
    no_results(tmp)
