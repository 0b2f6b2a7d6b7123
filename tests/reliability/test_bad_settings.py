"""Bad settings through the real CLI: unknown names, values out of range, refused combinations, mistyped flags,
long values, degenerate fits; each is one ``error:`` line, exit status 2, refused before any work, nothing left on
disk."""

from __future__ import annotations

import re

import pytest

from tests.helpers import args, case_args, cli_error, nothing_left, one_line, quiet, run_cli
from tests.reliability.conftest import no_results


def test_unknown_backbone(capsys):
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--model.backbone", "resnet99")
    assert "error: Unknown backbone 'resnet99'. Choose one of: densenet, densenet100" in err


def test_unknown_dataset(capsys):
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--data.dataset", "svhn")
    assert "error: Unknown dataset 'svhn'. Choose one of: cifar10, cifar100." in err


def test_an_unknown_featurenorm_block_fails_before_any_work(capsys, tmp_path):
    """The block is checked when the model is built, not at the first test batch after the statistics pass."""
    err = cli_error(capsys, "test", "--data", "SyntheticDataModule", "--model.backbone", "densenet100",
                    "--model.scorers", '{"featurenorm": {"block": "layer3.0"}}', *quiet(tmp_path))  # fmt: skip
    assert "featurenorm block 'layer3.0' is not a block of DenseNetBC: one of dense1, dense2, dense3" in err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        ('{"knn": {"k": 50}}', "knn cannot be fitted: k = 50 nearest neighbours need at least 50 training features in "
                               "the bank, which holds 10: lower k, or keep more training images in the bank"),
        ('{"gmm": {"dim": null}}', "gmm cannot be fitted: its 50 mixture components need at least 50 training "
                                   "features in the bank, which holds 10: lower components to at most 10"),
    ],
    ids=["knn k beyond the bank", "gmm components beyond the bank"],
)  # fmt: skip
def test_a_setting_beyond_the_training_images_is_refused_not_altered(case, capsys, scorers, message):
    """k larger than the bank (10 images: one per class) would silently take every feature, and sklearn refuses
    more mixture components than samples: refused through the CLI before any image is scored, with the setting as
    given and what to change."""
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.train_per_class", "1",
                                               "--model.scorers", scorers))  # fmt: skip
    assert err.startswith(f"error: {message}"), err
    no_results(tmp)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.tpr", "1.5"], "tpr (of the FPR@TPR metric) must be in (0, 1], got 1.5"),
        (["--model.tpr", "0"], "tpr (of the FPR@TPR metric) must be in (0, 1], got 0"),
        (["--model.scorers", '{"fmls": {"percentile": "abc"}}'], "percentile must be a number, got 'abc'"),
        (["--model.scorers", '{"energy": {"temperature": -1}}'], "temperature must be > 0, got -1"),
        (["--model.scorers", '{"energy": {"temperature": 0}}'], "temperature must be > 0, got 0"),
    ],
)
def test_bad_values_are_refused_at_construction(trained, tmp_path, capsys, extra, message):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), *extra))
    one_line(err)
    assert message in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", '{"clip_percentile": [150]}'], "--grid: clip_percentile: 150 is outside [0, 100]."),
        (["--grid", '{"percentile": []}'], "--grid: percentile needs a non-empty list of values, got []."),
        (["--val_size", "0"], "tune --val_size must be >= 1, got 0."),
        (["--output", "DIR"], "is a folder; give the file to write"),
        (["--output", "RO/selected.yaml"], "--output: cannot write into"),
    ],
)
def test_tune_checks_its_arguments_before_the_work(trained, tmp_path, capsys, unwritable, extra, message):
    data, ckpt = trained
    (tmp_path / "DIR").mkdir()
    (tmp_path / "RO").mkdir()
    unwritable.append(tmp_path / "RO")
    extra = [e.replace("DIR", str(tmp_path / "DIR")).replace("RO/", str(tmp_path / "RO") + "/") for e in extra]
    err = cli_error(capsys, "tune", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--cache_dir",
                                          str(tmp_path / "cache"), *extra))  # fmt: skip
    one_line(err)
    assert message in err
    assert not (tmp_path / "cache").exists()  # refused before any feature was extracted
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_validate_needs_held_out_images_and_predict_is_not_offered(trained, tmp_path, capsys, caplog):
    data, ckpt = trained
    err = cli_error(capsys, "validate", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert "validate measures the accuracy on held-out training images: set --data.init_args.val_split N" in err
    run_cli("validate", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.val_split", "10"))
    with pytest.raises(SystemExit) as info:
        run_cli("predict", *args(tmp_path / "logs", data))
    assert info.value.code == 2 and "predict" in capsys.readouterr().err  # not a subcommand


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        ("[fmlz]", "Unknown scorer 'fmlz'. Choose one of: adascale_a, adascale_l, ash_b, ash_b_map,"),
        ('{"fmls": {"percentile": 120}}', "percentile must be a percentile in [0, 100], got 120."),
        ('{"fmls": {"percentile": -5}}', "percentile must be a percentile in [0, 100], got -5."),
        ('{"fmls": {"clip": -0.5}}', "clip must be >= 0, got -0.5."),
        ('{"react": {"percentile": 101}}', "percentile must be a percentile in [0, 100], got 101."),
        ('{"fmls": {"lambda": 1.0}}', "Scorer 'fmls' has no hyperparameter 'lambda'. Valid: clip, clip_percentile,"),
        ('{"knn": {"k": 2.5}}', "k must be an integer >= 1, got 2.5."),  # a fractional k is refused, not rounded
        ('{"gmm": {"components": 0}}', "components must be an integer >= 1, got 0."),
    ],
)
def test_invalid_scorers(case, capsys, scorers, message):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--model.scorers", scorers))
    assert f"error: {message}" in err
    no_results(tmp)


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
    err = cli_error(capsys, command, *case_args(tmp, data, "--ckpt_path", str(ckpt), *cache, *extra))
    assert f"error: {message}" in err
    assert not (scratch / "cache").exists()
    no_results(tmp)


@pytest.mark.parametrize("module", ["SyntheticDataModule", "DemoDataModule"])
def test_the_seed_of_a_generated_data_module_is_checked(case, capsys, module):
    tmp, _, _, _ = case
    err = cli_error(capsys, "fit", "--data", module, "--data.seed", "-1", "--trainer.logger.init_args.save_dir",
                    str(tmp / "logs"))  # fmt: skip
    assert f"error: --data.init_args.seed {SEED_RANGE}, got -1." in err


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
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--data.train_per_class", "1",
                                               "--model.scorers", f"[msp, {scorer}]"))  # fmt: skip
    assert err.startswith(
        f"error: {scorer} cannot be fitted: the within-class covariance of its 10 training images (10 classes, one "
        f"image each) is zero up to rounding: it needs two different images of one class at least (11 images or more)"
    ), err
    no_results(tmp)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scorers", ["{}", "[]"])
def test_an_empty_scorer_set_is_refused(trained, tmp_path, capsys, scorers):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.scorers",
                                          scorers))  # fmt: skip
    one_line(err)
    assert "The scorer set is empty" in err and "no OOD sets configured" not in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_label_given_twice_in_a_mapping_is_refused(trained, tmp_path, capsys):
    data, ckpt = trained
    value = "{a: {scorer: msp}, a: {scorer: energy}}"
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.scorers", value))
    one_line(err)
    assert f"The key 'a' appears twice in one YAML mapping (in {value})" in err
    config = tmp_path / "scorers.yaml"
    config.write_text("model:\n  scorers:\n    a: {scorer: msp}\n    a: {scorer: energy}\n")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "-c", str(config)))
    one_line(err)
    assert f"{config}: The key 'a' appears twice in one YAML mapping (lines 3 and 4 of a config)" in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_mistyped_flag_prints_the_error_first_and_briefly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("test", "-c", "configs/demo.yaml", "--model.scorerz", "[msp]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err[:300]
    assert "--model.scorerz" in err and "usage:" not in err
    assert len(err.splitlines()) <= 14
    assert "See `lightning-ood test --help` for the options." in err or "--help` for the options." in err
