"""Published weights: every format converted exactly (checked against an independent forward pass written here on the
original keys), the weights' normalisation in every loader, the `import` command, clear errors through the CLI, and
the real DICE DenseNets of ../shared/checkpoints when they are there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.errors import CheckpointError, ConfigError
from lightning_ood.models import pretrained_backbone
from tests.conftest import REPO, make_cifar_folder, shared_data
from tests.helpers import cli_error, run_cli
from tests.references import bn, densenet3_forward, densenet3_state, openood_resnet18_state

SHARED_CHECKPOINTS = Path(os.environ.get("LIGHTNING_OOD_SHARED_CHECKPOINTS", REPO.parent / "shared" / "checkpoints"))
DICE = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


# ------------------------------------------------------------------------------------------------ generated originals


def openood_resnet18_forward(s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """ResNet18_32x32.forward from OpenOOD's definition: relu(bn1(conv1)), 4 stages of 2 BasicBlocks (stride 2 from
    stage 2, projection shortcut when the shape changes), adaptive average pooling, fc."""
    out = F.relu(bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            y = F.relu(bn(F.conv2d(out, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
            y = bn(F.conv2d(y, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in s:
                short = bn(F.conv2d(out, s[f"{p}.shortcut.0.weight"], stride=stride), s, f"{p}.shortcut.1")
            else:
                short = out
            out = F.relu(y + short)
    h = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return h, F.linear(h, s["fc.weight"], s["fc.bias"])


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Generated files in each published layout."""
    tmp = tmp_path_factory.mktemp("published")
    dense = densenet3_state()
    files = {
        "dice": tmp / "checkpoint_100.pth.tar",  # {'epoch', 'state_dict'} as the DICE repository
        "dataparallel": tmp / "dataparallel.pth",  # bare state dict saved from DataParallel
        "openood": tmp / "best.ckpt",
        "cifar100": tmp / "cifar100.pth.tar",
    }
    torch.save({"epoch": 100, "state_dict": dense}, files["dice"])
    torch.save({f"module.{k}": v for k, v in dense.items()}, files["dataparallel"])
    torch.save(openood_resnet18_state(), files["openood"])
    torch.save({"epoch": 100, "state_dict": densenet3_state(classes=100)}, files["cifar100"])
    return files


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("file", ["dice", "dataparallel"])
def test_densenet3_is_converted_exactly(published, file):
    loaded = pretrained_backbone("densenet100", 10, str(published[file]))
    assert loaded.loaded.format.name == "densenet3"
    assert loaded.normalization.mean == DICE[0] and loaded.normalization.std == DICE[1]
    net = loaded.backbone.eval()
    h, logits = densenet3_forward(densenet3_state(), X)
    with torch.no_grad():
        torch.testing.assert_close(net.features(X), h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(X), logits, rtol=1e-4, atol=1e-5)
    assert len(loaded.loaded.state) == len(densenet3_state()) == len(net.state_dict())


def test_openood_resnet18_is_converted_exactly(published):
    loaded = pretrained_backbone("resnet18", 10, str(published["openood"]))
    assert loaded.loaded.format.name == "openood_resnet18"
    assert loaded.normalization.std == (0.2470, 0.2435, 0.2616)  # OpenOOD's CIFAR-10 normalisation
    net = loaded.backbone.eval()
    h, logits = openood_resnet18_forward(openood_resnet18_state(), X)
    with torch.no_grad():
        torch.testing.assert_close(net.features(X), h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(X), logits, rtol=1e-4, atol=1e-5)
    c100 = pretrained_backbone("resnet18", 100, None)  # OpenOOD's CIFAR-100 values come with a 100-class head
    state = openood_resnet18_state(classes=100)
    path = published["openood"].with_name("c100.ckpt")
    torch.save(state, path)
    assert pretrained_backbone("resnet18", 100, str(path)).normalization.mean == (0.5071, 0.4867, 0.4408)
    assert c100.normalization is None  # no weights: the dataset's normalisation


def test_own_state_dicts_round_trip(tmp_path):
    source = pretrained_backbone("resnet20", 10).backbone
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, tmp_path / "prefixed.pth")
    for name in ("plain.pth", "prefixed.pth"):
        loaded = pretrained_backbone("resnet20", 10, str(tmp_path / name))
        assert loaded.loaded.format.name == "state_dict" and loaded.normalization is None
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.backbone.state_dict()[key], value)


def test_format_errors(published, tmp_path):
    with pytest.raises(CheckpointError, match="set --model.backbone densenet100"):  # noqa: RUF043
        pretrained_backbone("resnet18", 10, str(published["dice"]))
    with pytest.raises(CheckpointError, match="has a head for 100 classes but the data has 10 classes"):
        pretrained_backbone("densenet100", 10, str(published["cifar100"]))
    broken = densenet3_state()
    del broken["block2.layer.3.conv2.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["fc.weight"] = torch.zeros(10, 300)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as info:
        pretrained_backbone("densenet100", 10, str(tmp_path / "broken.pth"))
    message = str(info.value)
    assert "1 missing keys (first: dense.1.3.conv2.weight)" in message
    assert "1 unexpected keys (first: extra.weight)" in message
    assert "1 shape mismatches (first: head.weight (10, 300) vs (10, 342))" in message
    both = densenet3_state() | openood_resnet18_state()
    torch.save(both, tmp_path / "both.pth")
    with pytest.raises(CheckpointError, match=r"fits several formats \(densenet3, openood_resnet18\)"):
        pretrained_backbone("densenet100", 10, str(tmp_path / "both.pth"))
    with pytest.raises(CheckpointError, match=r"does not fit a DenseNet3 .* unexpected keys"):  # named: checked as that
        pretrained_backbone("densenet100", 10, str(tmp_path / "both.pth"), weights_format="densenet3")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="fits none of the known formats"):
        pretrained_backbone("densenet100", 10, str(tmp_path / "foreign.pth"))
    with pytest.raises(ConfigError, match="Unknown weights format 'dice'"):
        pretrained_backbone("densenet100", 10, str(published["dice"]), weights_format="dice")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        pretrained_backbone("densenet100", 10, str(tmp_path / "garbage.pth"))


# ------------------------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return make_cifar_folder(tmp_path_factory.mktemp("cifar"), train=4, test=2)


def cli_args(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--data.ood", '[{"name": "gaussian_noise", "size": 12}]', "--model.backbone", "densenet100",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"), *extra]  # fmt: skip


def test_test_evaluates_published_weights_with_their_normalisation(published, cifar, tmp_path, caplog):
    caplog.set_level("INFO")
    run_cli("test", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]), "--model.scorers",
                              "[msp, fmls, bats]", "--trainer.logger.init_args.version", "dice"))  # fmt: skip
    assert "Input normalisation: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)" in caplog.text
    result = json.loads((tmp_path / "logs" / "lightning_ood" / "dice" / "ood_results.json").read_text())
    assert result["provenance"]["weights"] == str(published["dice"])
    assert result["provenance"]["input_normalization"].startswith("mean (0.4914, 0.4822, 0.4465), std (0.2023")
    assert result["num_images"] == {"cifar10": 20, "gaussian_noise": 12}
    # The ID accuracy is that of the original network on these images with the DICE normalisation.
    from torchvision.datasets import ImageFolder

    from lightning_ood.data.transforms import Normalization, eval_transform

    images = ImageFolder(str(cifar / "test"), transform=eval_transform(Normalization(*DICE)))
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor(images.targets)
    _, logits = densenet3_forward(densenet3_state(), x)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert not (tmp_path / "ckpt").exists()  # a test writes no checkpoint


def test_import_writes_a_checkpoint_that_test_uses_as_is(published, cifar, tmp_path, caplog, capsys):
    caplog.set_level("INFO")
    out = tmp_path / "imported.ckpt"
    run_cli("import", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]),
                                "--data.train_per_class", "3", "--output", str(out)))  # fmt: skip
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["input_normalization"]["mean"] == list(DICE[0])
    assert checkpoint["ood_statistics"]["counts"].tolist() == [3] * 10  # the first 3 images of each class
    assert checkpoint["ood_statistics"]["images"] == "cifar10 training images, first 3 per class"
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    caplog.clear()
    run_cli("test", *cli_args(tmp_path, cifar, "--ckpt_path", str(out), "--data.train_per_class", "3",
                              "--model.scorers", "[energy, fmls]",
                              "--trainer.logger.init_args.version", "imported"))  # fmt: skip
    assert "OOD statistics" not in caplog.text  # neither converted nor fitted again
    assert "Input normalisation: mean (0.4914, 0.4822, 0.4465)" in caplog.text  # stored with the checkpoint
    result = json.loads((tmp_path / "logs" / "lightning_ood" / "imported" / "ood_results.json").read_text())
    assert result["provenance"]["statistics_count"] == 30
    # The same checkpoint as model.weights (the lightning_ood format) brings its statistics along.
    again = pretrained_backbone("densenet100", 10, str(out))
    assert again.loaded.format.name == "lightning_ood" and again.loaded.statistics is not None
    capsys.readouterr()
    err = cli_error(capsys, "import", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]),
                                                "--output", str(out)))  # fmt: skip
    assert f"{out} exists; pass --overwrite true to replace it." in err


@pytest.mark.parametrize(
    ("weights", "extra", "message"),
    [
        ("garbage", [], "cannot be read"),
        ("cifar100", [], "has a head for 100 classes but the data has 10 classes"),
        ("dice", ["--model.backbone", "resnet18"], "set --model.backbone densenet100"),
        (
            "openood",
            ["--model.backbone", "resnet18", "--model.weights_format", "densenet3"],
            "weights_format densenet3",
        ),
        ("missing", [], "does not exist"),
    ],
)
def test_bad_weights_are_one_clear_error(published, cifar, tmp_path, capsys, weights, extra, message):
    path = {"garbage": tmp_path / "garbage.pth.tar", "missing": tmp_path / "nope.pth"}.get(
        weights, published.get(weights)
    )
    if weights == "garbage":
        path.write_bytes(b"\x00" * 100)
    err = cli_error(capsys, "test", *cli_args(tmp_path, cifar, "--model.weights", str(path), *extra))
    assert message in err and str(path) in err
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("ood_results.*"))


def test_fit_fine_tunes_from_published_weights(published, cifar, tmp_path, caplog):
    caplog.set_level("INFO")
    run_cli("fit", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]), "--trainer.max_epochs", "1",
                             "--data.batch_size", "20", "--model.lr", "1e-9"))  # fmt: skip
    assert "Loaded " in caplog.text and "densenet3" in caplog.text
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    original = densenet3_state()
    # a tiny learning rate: the weights are still the converted ones (a random initialisation is far from them)
    for ours, theirs in (("backbone.conv1.weight", "conv1.weight"), ("backbone.head.weight", "fc.weight")):
        torch.testing.assert_close(checkpoint["state_dict"][ours], original[theirs], rtol=0, atol=1e-6)
    assert checkpoint["input_normalization"]["std"] == list(DICE[1])  # training used the weights' normalisation


def test_tune_and_normratio_take_published_weights_without_a_checkpoint(published, cifar, tmp_path, caplog):
    caplog.set_level("INFO")
    run_cli("tune", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]), "--val_size", "10",
                              "--noise_size", "10", "--grid", '{"percentile": [60], "clip_percentile": [90]}',
                              "--cache_dir", str(tmp_path / "cache"), "--model.scorers", "[fmls]"))  # fmt: skip
    assert "Selected percentile = 60" in caplog.text
    assert "OOD statistics on the rest: cifar10 training images, 10 held out (seed 0)" in caplog.text
    run_cli("tune", *cli_args(tmp_path, cifar, "--model.weights", str(published["dice"]), "--scorer", "featurenorm",
                              "--settings", '{"normratio_images": 8}'))  # fmt: skip
    assert "FeatureNorm block:" in caplog.text


# ------------------------------------------------------------------------------------------------ timm's ViT-B/16


def test_timm_vit_loads_a_local_file_and_explains_a_missing_download(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import timm
    from safetensors.torch import save_file

    from lightning_ood.models.timm_vit import TimmViTB16

    reference = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = pretrained_backbone("vit_base_patch16_224", 1000, str(tmp_path / "model.safetensors"))
    assert isinstance(loaded.backbone, TimmViTB16) and loaded.normalization.mean == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 224, 224)
    net = loaded.backbone.eval()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(net.features(x), expected)
        torch.testing.assert_close(net(x), reference(x))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError) as info:
        pretrained_backbone("vit_base_patch16_224", 1000, "augreg2_in21k_ft_in1k")
    message = str(info.value)
    assert "model.safetensors of https://huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in message
    assert "--model.weights <path to model.safetensors>" in message


# ------------------------------------------------------------------------------------------------ the real files


def real(name: str) -> Path:
    path = SHARED_CHECKPOINTS / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


@pytest.mark.parametrize(("name", "classes"), [("dice-densenet100-cifar10.pth.tar", 10),
                                               ("dice-densenet100-cifar100.pth.tar", 100)])  # fmt: skip
def test_real_dice_densenets_convert_every_key(name, classes):
    path = real(name)
    original = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    loaded = pretrained_backbone("densenet100", classes, str(path))
    assert loaded.loaded.format.name == "densenet3"
    assert len(original) == len(loaded.loaded.state) == len(loaded.backbone.state_dict()) == 596
    net = loaded.backbone.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, logits = densenet3_forward(original, x)
        torch.testing.assert_close(net.features(x), h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(x), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_dice_cifar10_densenet_accuracy_on_the_jpeg_copy():
    """The DICE CIFAR-10 DenseNet (about 94.5% on the original test set) on the lossy JPEG copy."""
    path = real("dice-densenet100-cifar10.pth.tar")
    test = shared_data("cifar10-jpeg", "test")
    from torchvision.datasets import ImageFolder

    from lightning_ood.data.transforms import eval_transform

    loaded = pretrained_backbone("densenet100", 10, str(path))
    images = ImageFolder(str(test), transform=eval_transform(loaded.normalization))
    loader = torch.utils.data.DataLoader(images, batch_size=32, num_workers=1)
    net, correct = loaded.backbone.eval(), 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(1) == y).sum())
    accuracy = correct / len(images)
    print(f"DICE CIFAR-10 DenseNet on {test}: {100 * accuracy:.2f}% of {len(images)}")
    assert len(images) == 10000 and 0.78 < accuracy < 0.90


def test_a_model_built_with_every_scorer_pickles():
    """``ddp_spawn`` and ``torch.save(model)`` pickle the LightningModule: scorers bound to the network (BatchNorm
    hooks with closures) must not be held by a freshly built model."""
    import pickle

    from lightning_ood.module import OODClassifier

    for backbone in ("resnet20", "densenet100"):
        model = OODClassifier(backbone=backbone, num_classes=3, scorers="all")
        assert pickle.loads(pickle.dumps(model)).scorer_specs == model.scorer_specs
