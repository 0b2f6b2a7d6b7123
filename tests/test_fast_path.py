"""The GPU fast path, checked where it can be on a CPU: the precision default, channels-last and torch.compile through
the CLI's own Trainer (checkpoints keep their keys, training is the same to float rounding), and scores computed in
float32 whatever the Trainer's precision."""

import json
from pathlib import Path

import pytest
import torch

from lightning_ood.cli import fast_precision
from tests.test_cli import cli_error, quiet, run_cli


def test_precision_default_is_bf16_only_to_train_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_precision("fit", None, "auto") is None  # CPU: Lightning's 32-bit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert fast_precision("fit", None, "auto") == "bf16-mixed"
    assert fast_precision("fit", None, "gpu") == "bf16-mixed"
    assert fast_precision("fit", None, "cpu") is None  # a CPU run asked for on a GPU machine
    assert fast_precision("fit", "32-true", "auto") == "32-true"  # the user's choice stands
    assert fast_precision("test", None, "auto") is None  # evaluation: float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert fast_precision("fit", None, "auto") == "16-mixed"  # pre-Ampere GPUs


def fit_args(cifar_folder: Path, tmp_path: Path) -> list[str]:
    return [
        "--data", "CIFARDataModule", "--data.root", str(cifar_folder), "--data.batch_size", "16",
        "--data.num_workers", "0", "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--seed_everything", "3", *quiet(tmp_path),
    ]  # fmt: skip


def test_compile_trains_the_same_network_and_keeps_checkpoint_keys(cifar_folder, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "plain"))
    assert not torch._dynamo.utils.counters["stats"], "nothing compiled without the switch"
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "compiled"), "--model.compile", "eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the CLI's Trainer ran the compiled forward"
    plain = torch.load(tmp_path / "plain" / "ckpt" / "last.ckpt", weights_only=True)
    compiled = torch.load(tmp_path / "compiled" / "ckpt" / "last.ckpt", weights_only=True)
    assert plain["state_dict"].keys() == compiled["state_dict"].keys(), "compiling does not rename checkpoint keys"
    assert compiled["global_step"] == plain["global_step"] == 4
    for key, value in plain["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][key], value, msg=key)


def conv_input_formats(run) -> set[tuple[bool, bool]]:
    """``(training, channels-last input)`` of every convolution call while ``run()`` runs."""
    seen = set()

    def record(module, inputs):
        if isinstance(module, torch.nn.Conv2d) and inputs[0].dim() == 4 and inputs[0].shape[1] > 1:
            seen.add((module.training, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("flag, expected", [([], False), (["--model.channels_last", "true"], True)])
def test_channels_last_during_training_only(cifar_folder, tmp_path, flag, expected):
    seen = conv_input_formats(lambda: run_cli("fit", *fit_args(cifar_folder, tmp_path), *flag))
    assert {channels_last for training, channels_last in seen if training} == {expected}  # default on CPU: off
    assert {channels_last for training, channels_last in seen if not training} == {False}  # statistics pass
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert all(t.is_contiguous() for t in checkpoint["state_dict"].values()), "saved in the default format"


def test_unknown_compile_backend_is_refused(capsys):
    message = cli_error(capsys, "fit", "--data", "SyntheticDataModule", "--model.compile", "turbo")
    assert "torch.compile backend" in message


def test_mixed_precision_trainer_scores_in_float32(cifar_folder, tmp_path):
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "fit"))
    checkpoint = str(tmp_path / "fit" / "ckpt" / "last.ckpt")
    results, dtypes = {}, set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            dtypes.add(output.dtype)

    for precision in ("32-true", "bf16-mixed"):
        folder = tmp_path / precision
        handle = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            run_cli("test", *fit_args(cifar_folder, folder), "--ckpt_path", checkpoint,
                "--trainer.precision", precision,
                "--model.scorers", "[msp, energy, odin, mahalanobis, fmls]",
                "--data.ood", "[{name: gaussian_noise, size: 30}, {name: uniform_noise, size: 20}]",
                "--trainer.logger.init_args.version", "run")  # fmt: skip
        finally:
            handle.remove()
        (found,) = folder.glob("logs/*/run/ood_results.json")
        results[precision] = json.loads(found.read_text())
    assert dtypes == {torch.float32}, "the network ran in float32 under the bf16-mixed Trainer"
    assert results["bf16-mixed"]["metrics"] == results["32-true"]["metrics"]
    assert results["bf16-mixed"]["metrics"], "there were results to compare"


def test_mixed_precision_fit_trains_in_bf16_and_validates_in_float32(cifar_folder, tmp_path):
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.add((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_cli("fit", *fit_args(cifar_folder, tmp_path), "--trainer.precision", "bf16-mixed",
                "--data.val_split", "10")  # fmt: skip
    finally:
        handle.remove()
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # val/acc and the statistics


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_on_cuda(cifar_folder, tmp_path):
    run_cli("fit", *[a if a != "cpu" else "gpu" for a in fit_args(cifar_folder, tmp_path)], "--model.compile", "true")
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
