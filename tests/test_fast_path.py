"""The GPU fast path, checked where it can be on a CPU: the precision default, channels-last and torch.compile through
the CLI's own Trainer (checkpoints keep their keys, training is the same to float rounding), and scores computed in
float32 whatever the Trainer's precision."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lightning_ood.cli import fast_benchmark, fast_precision
from lightning_ood.fast_path import match_state_strides
from lightning_ood.graphed import CudaGraphReplayer, EagerReplayer, GraphedStep
from lightning_ood.precision import device_constant
from tests.helpers import CountHostReads, CountTestHostReads, cli_error, quiet, run_cli


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


def test_cudnn_search_only_to_train_on_cuda_unless_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_benchmark("fit", None, None, "auto") is None  # CPU: Lightning's default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fast_benchmark("fit", None, None, "auto") is True
    assert fast_benchmark("fit", None, True, "auto") is None, "deterministic: no search"
    assert fast_benchmark("fit", False, None, "auto") is False, "the user's choice stands"
    assert fast_benchmark("fit", None, None, "cpu") is None
    assert fast_benchmark("test", None, None, "auto") is None


def test_device_constants_follow_device_and_dtype_and_are_made_once():
    made = device_constant([0.5, 0.25], torch.float64, torch.device("meta"))
    assert made.device.type == "meta" and made.dtype == torch.float64 and made.shape == (2,)
    assert device_constant((0.5, 0.25), torch.float64, "meta") is made, "cached: no copy to the device per batch"
    assert device_constant((0.5, 0.25), torch.float32, "meta") is not made


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
@pytest.mark.parametrize("switch", ["compile", "cuda_graphs"])
def test_fast_path_on_cuda(cifar_folder, tmp_path, monkeypatch, switch):
    replays = []
    real = CudaGraphReplayer.replay
    monkeypatch.setattr(CudaGraphReplayer, "replay", lambda self: replays.append(1) or real(self))
    args = [a if a != "cpu" else "gpu" for a in fit_args(cifar_folder, tmp_path)]
    run_cli("fit", *args, "--trainer.max_epochs", "2", f"--model.{switch}", "true")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert len(replays) == (3 if switch == "cuda_graphs" else 0), "full batches after the 3 warm-up steps"


def test_training_steps_never_wait_for_the_device(cifar_folder, tmp_path):
    """On a GPU, each read of a device tensor's value (a logged loss for the progress bar, a metric's argument check)
    stalls the host until the device has finished its queued work, so the next step's kernels are not queued in time.
    Through the CLI's Trainer, progress bar on: no batch but an epoch's first and last reads a device value when
    nothing is logged in between (the logger reads at its interval, the bar at the end of the epoch)."""
    run_cli("fit", *fit_args(cifar_folder, tmp_path), "--trainer.enable_progress_bar", "true",
            "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1000",
            "--trainer.callbacks+=tests.helpers.CountHostReads")  # fmt: skip
    batches = CountHostReads.batches
    assert len(batches) == 8, "two epochs of 60 images in batches of 16"
    waits = {f"batch {i}": reads for i, last, reads in batches if reads and i > 0 and not last}  # once an epoch: ok
    assert not waits, f"host reads of device values during training steps: {waits}"


def test_graphed_step_computes_the_eager_gradients_in_the_network_dtype():
    """The fixed-tensor pass of cuda_graphs (uncaptured on a CPU) gives the loss and gradients of an eager step, in the
    network's dtype (a ``double()`` network), and declines a batch of another shape."""
    torch.manual_seed(0)
    nn = torch.nn
    layers = (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    network = nn.Sequential(*layers).double()
    twin = copy.deepcopy(network)
    step = GraphedStep(network, warmup=1, replayer=EagerReplayer())
    for _ in range(3):  # one warm-up step, the capture, a replay
        x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(5, (6,))
        loss, logits = step(x, y)
        twin.zero_grad()
        expected = torch.nn.functional.cross_entropy(twin(x), y)
        expected.backward()
        assert loss.dtype == torch.float64 and logits.shape == (6, 5)
        torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)
        for p, q in zip(network.parameters(), twin.parameters(), strict=True):
            assert p.grad.dtype == torch.float64
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(network[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    assert step.captured and step.steps == 3
    assert step(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(5, (4,))) is None, "another shape: eager"


def test_graphed_step_is_shaped_on_a_full_batch_only():
    """A run resumed on an epoch's last, smaller batch must not fix the graph's shape on it."""
    step = GraphedStep(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), replayer=EagerReplayer())
    step.rows = 6
    assert step(torch.randn(4, 3, 2, 2), torch.randint(3, (4,))) is None and step.x is None
    assert step(torch.randn(6, 3, 2, 2), torch.randint(3, (6,))) is not None and step.x.shape[0] == 6


def test_resumed_optimiser_state_takes_the_parameters_strides():
    """CUDA's fused SGD refuses momentum buffers whose strides differ from their parameter's, as a checkpoint written
    in another memory format restores them (a CPU run resumed on a GPU, channels_last switched)."""
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    old = torch.randn(conv.weight.shape)  # contiguous, as saved by a run in the default format
    optimizer.state[conv.weight]["momentum_buffer"] = old
    match_state_strides(optimizer)
    buffer = optimizer.state[conv.weight]["momentum_buffer"]
    assert buffer.stride() == conv.weight.stride() != old.stride()
    torch.testing.assert_close(buffer, old, rtol=0, atol=0)


def test_cuda_graphs_switch_trains_exactly_as_eager_through_the_cli(cifar_folder, tmp_path, monkeypatch):
    """``--model.cuda_graphs true`` through the CLI's Trainer: warm-up steps, one capture, replays of the full batches
    and eager steps for each epoch's last, smaller batch train the very network the eager run trains (on a CPU the
    pass is replayed uncaptured: the fixed tensors, the gradient hand-over to Lightning's optimiser step and the
    skipped backward are what is checked here; the graph itself by make gpu-check)."""
    calls = {"capture": 0, "replay": 0}
    capture, replay = EagerReplayer.capture, EagerReplayer.replay

    def counted(name, real):
        def wrapper(self, *args):
            calls[name] += 1
            return real(self, *args)

        return wrapper

    monkeypatch.setattr(EagerReplayer, "capture", counted("capture", capture))
    monkeypatch.setattr(EagerReplayer, "replay", counted("replay", replay))
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "eager"), "--trainer.max_epochs", "2")
    assert calls == {"capture": 0, "replay": 0}
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "graphed"), "--trainer.max_epochs", "2",
            "--model.cuda_graphs", "true")  # fmt: skip
    # 60 images in batches of 16: 3 full batches and one of 12 an epoch; 3 warm-up steps, then capture and replays
    assert calls == {"capture": 1, "replay": 3}
    eager = torch.load(tmp_path / "eager" / "ckpt" / "last.ckpt", weights_only=True)
    graphed = torch.load(tmp_path / "graphed" / "ckpt" / "last.ckpt", weights_only=True)
    assert graphed["global_step"] == eager["global_step"] == 8
    for key, value in eager["state_dict"].items():
        torch.testing.assert_close(graphed["state_dict"][key], value, rtol=0, atol=0)
    assert (
        graphed["optimizer_states"][0]["param_groups"][0]["lr"] == eager["optimizer_states"][0]["param_groups"][0]["lr"]
    )


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches"),
        (["--model.compile", "eager"], "not with compile"),
        (["--trainer.detect_anomaly", "true"], "detect_anomaly"),
    ],
)  # fmt: skip  (16-mixed's loss scaling is refused too; Lightning turns it into bf16-mixed on a CPU)
def test_cuda_graphs_refused_where_the_step_cannot_be_captured(cifar_folder, tmp_path, caplog, flags, reason):
    with caplog.at_level("INFO"):
        run_cli("fit", *fit_args(cifar_folder, tmp_path), "--model.cuda_graphs", "true", *flags)
    assert "cuda_graphs: " in caplog.text and reason in caplog.text and "runs eagerly" in caplog.text
    assert (tmp_path / "ckpt" / "last.ckpt").exists(), "the run trains on, eagerly"


def test_test_pass_never_waits_for_the_device(cifar_folder, tmp_path):
    """The one-pass test of every scorer in the paper's tables but LINE (which groups each batch's samples by
    predicted class, so it reads their counts): no test batch reads a device value on the host; the results are
    read once, at the end."""
    run_cli("fit", *fit_args(cifar_folder, tmp_path / "fit"))
    scorers = "[msp, odin, mahalanobis, energy, bats, dice, react, dice_react, fmls, react_fm, react_ls, fm_ls, " \
              "msp_react, msp_fmls, odin_react, odin_fmls]"  # fmt: skip
    run_cli("test", *fit_args(cifar_folder, tmp_path / "test"), "--model.scorers", scorers,
            "--ckpt_path", str(tmp_path / "fit" / "ckpt" / "last.ckpt"), "--data.eval_batch_size", "8",
            "--data.ood", "[{name: gaussian_noise, size: 24}, {name: uniform_noise, size: 24}]",
            "--trainer.callbacks+=tests.helpers.CountTestHostReads")  # fmt: skip
    batches = CountTestHostReads.batches
    assert len(batches) == 4 + 3 + 3, "30 ID test images and 24 of each OOD set in batches of 8"
    waits = {f"set {d} batch {b}": reads for d, b, reads in batches[1:] if reads}  # the first: set-up, once
    assert not waits, f"host reads of device values during test batches: {waits}"


def test_a_resume_in_another_memory_format_restrides_the_momentum(cifar_folder, tmp_path):
    """Through the CLI: a run trained in the default format, resumed channels-last (as a CPU run resumed on a GPU
    is), trains on with momentum buffers in the parameters' strides, which CUDA's fused SGD requires."""
    run_cli("fit", *fit_args(cifar_folder, tmp_path))
    run_cli("fit", *fit_args(cifar_folder, tmp_path), "--trainer.max_epochs", "2", "--model.channels_last", "true",
            "--ckpt_path", "last", "--overwrite_results", "true")  # fmt: skip
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8, "the resumed run trained its second epoch"
    buffers = [s["momentum_buffer"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    convs = [b for b in buffers if b.dim() == 4 and b.shape[1] > 1]
    assert convs and all(b.is_contiguous(memory_format=torch.channels_last) for b in convs)
