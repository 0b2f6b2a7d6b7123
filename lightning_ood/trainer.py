"""``OODTrainer``: Lightning's Trainer plus the OOD commands, exposed by the CLI as subcommands.

- ``import``: convert published weights (``model.weights``) into a Lightning checkpoint with the fitted OOD
  statistics and the weights' normalisation, so later runs start in seconds;

- ``tune``: choose the paper's p and lambda on Gaussian noise (Section V-F) and write them as a config overlay;
- ``sweep``: FPR95/AUROC of ``fmls`` (and LINE / ReAct) over lambda and over p for every OOD set (Figures 6, 7);
- ``normratio``: choose the FeatureNorm block by NormRatio on jigsaw-shuffled training images (Yu et al.).

``tune`` and ``sweep`` extract features once per (weights, dataset, transform) into a cache and work on the cached
tensors, so a second run, or a finer grid, costs seconds. The commands run in one process.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from rich.table import Table

from lightning_ood.checkpoints import read_checkpoint
from lightning_ood.data.base import OODDataModule, attach_normalization
from lightning_ood.data.sets import NoiseImages
from lightning_ood.errors import ConfigError
from lightning_ood.features import FeatureCache, FeatureSet, weights_fingerprint
from lightning_ood.io import atomic_write, atomic_write_text, check_writable_folder
from lightning_ood.module import OODClassifier
from lightning_ood.tuning import (
    DEFAULT_CLIP_PERCENTILES,
    DEFAULT_PERCENTILES,
    select_fmls,
    selected_scorers,
    sensitivity_sweeps,
    sweep_figure,
    to_csv,
    with_average,
)

SWEEP_LAMBDA_PERCENTILES = (5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 97.5, 99.0, 99.9)
SWEEP_PERCENTILES = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)


def load_weights(model: OODClassifier, ckpt_path: str | None) -> None:
    """Load a checkpoint's weights and statistics into ``model`` (clear errors for a missing or foreign file)."""
    if ckpt_path is None:
        raise ConfigError(
            "This command evaluates a trained model: pass --ckpt_path <checkpoint> or --model.weights <published "
            "weights>."
        )
    checkpoint = read_checkpoint(ckpt_path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])


def check_grid(name: str, values: list[float] | None, low: float = 0.0, high: float | None = 100.0) -> None:
    """A hyperparameter grid of a command: ``None`` (unset) or a non-empty list of numbers in ``[low, high]``."""
    if values is None:
        return
    if not values:
        raise ConfigError(f"--{name} is empty: give at least one value.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"--{name}: {value!r} is not a number.")
        if value < low or (high is not None and value > high):
            bounds = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ConfigError(f"--{name}: {value:g} is outside {bounds}.")


def check_output_file(output: str | None) -> None:
    """An ``--output`` file: not a folder, in a writable folder (checked before any work)."""
    if output is None:
        return
    target = Path(output).expanduser()
    if target.is_dir() or str(output).endswith(("/", "\\")):
        raise ConfigError(f"--output {output} is a folder; give the file to write (for example {target / 'x.yaml'}).")
    check_writable_folder(target.parent, "--output")


class OODTrainer(Trainer):
    """A Trainer with the ``tune``, ``sweep`` and ``normratio`` commands (see the module docstring)."""

    def _load(self, model: OODClassifier, datamodule: OODDataModule, ckpt_path: str | None) -> torch.device:
        if self.world_size > 1:
            raise ConfigError("tune, sweep and normratio run in one process: use --trainer.devices 1.")
        device = self.strategy.root_device
        if ckpt_path is not None or model.hparams.weights is None:  # published weights need no checkpoint
            load_weights(model, ckpt_path)
        model.to(device).eval()
        datamodule.trainer = None
        attach_normalization(model, datamodule)
        datamodule.prepare_data()
        return device

    def _prepare(self, model: OODClassifier, datamodule: OODDataModule, ckpt_path: str | None, cache: FeatureCache):
        device = self._load(model, datamodule, ckpt_path)
        datamodule.setup("test")
        model.ensure_statistics(datamodule, None, str(cache.folder))  # computed once, then kept in the cache
        return device

    def _log_dir(self) -> Path:
        folder = Path(self.log_dir or self.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _features(cache: FeatureCache, model, name, dataset, device, weights, batch_size: int) -> FeatureSet:
        features, hit = cache.get(name, model.backbone, dataset, weights=weights, device=device, batch_size=batch_size)
        rank_zero_info(f"{name}: {len(features)} images, features {'from the cache' if hit else 'extracted'}.")
        return features

    def tune(
        self,
        model: OODClassifier,
        datamodule: OODDataModule,
        ckpt_path: str | None = None,
        percentiles: list[float] = list(DEFAULT_PERCENTILES),  # noqa: B006  (jsonargparse reads the default)
        clips: list[float] | None = None,
        clip_percentiles: list[float] = list(DEFAULT_CLIP_PERCENTILES),  # noqa: B006
        val_size: int = 2000,
        noise_size: int = 2000,
        seed: int = 0,
        cache_dir: str = "cache/features",
        output: str | None = None,
    ) -> dict:
        """Select the paper's p and lambda on ID validation images vs Gaussian noise N(0, 1).

        Args:
            model: the model (from the config).
            datamodule: the data (from the config); its training images provide the ID validation subset.
            ckpt_path: the checkpoint to tune.
            percentiles: masking percentiles p to try (the paper: 10, 20, ..., 90).
            clips: absolute lambdas to try; when unset, lambda runs over ``clip_percentiles``.
            clip_percentiles: lambdas as percentiles of the training activations.
            val_size: ID validation images when ``data.val_split`` is 0: that many training images (test transform,
                a permutation seeded by ``seed``) are held out from the OOD statistics, which tune fits again on the
                remaining images. With ``data.val_split`` set, its held-out images (excluded from training and
                statistics alike) are the ID validation images.
            noise_size: Gaussian-noise images.
            seed: seed of the validation subset (when ``data.val_split`` is 0) and of the noise.
            cache_dir: feature cache folder.
            output: also write the selected overlay here (it is always written to the run's log folder).

        Returns:
            ``{"percentile": p, "clip": lambda, "fpr95": ..., "auroc": ..., "overlay": path}``.
        """
        check_grid("percentiles", percentiles)
        check_grid("clips", clips, high=None)
        check_grid("clip_percentiles", clip_percentiles)
        check_output_file(output)
        for name, value in (("val_size", val_size), ("noise_size", noise_size)):
            if value < 1:
                raise ConfigError(f"tune --{name} must be >= 1, got {value}.")
        cache = FeatureCache(cache_dir)
        if not datamodule.val_split:  # hold the validation images out of the statistics (not of a published training)
            datamodule.val_split, datamodule.val_seed = val_size, seed
        device = self._prepare(model, datamodule, ckpt_path, cache)
        rank_zero_info(
            f"ID validation: {datamodule.val_split} training images held out (seed {datamodule.val_seed}); OOD "
            f"statistics on the rest: {datamodule.describe_statistics_images()}."
        )
        weights = weights_fingerprint(model.backbone)
        batch = datamodule.eval_batch_size
        id_val = self._features(cache, model, f"{datamodule.id_name}_val", datamodule.validation_set(),
                                device, weights, batch)  # fmt: skip
        shape = (3, datamodule.image_size, datamodule.image_size)
        noise_set = NoiseImages(size=noise_size, shape=shape, seed=seed + 1)
        noise = self._features(cache, model, "gaussian_noise_val", noise_set, device, weights, batch)
        start = time.perf_counter()
        head = copy.deepcopy(model.backbone.head).cpu()  # cached features live on the CPU
        best, grid = select_fmls(model.ood_statistics, head, id_val, noise, percentiles, clips, clip_percentiles)
        elapsed = time.perf_counter() - start
        self._print_grid(grid, best)

        folder = self._log_dir()
        overlay = {"model": {"scorers": selected_scorers(model.scorer_specs, best)}}
        text = (
            f"# Selected by `lightning-ood tune` on {len(id_val)} ID validation images vs {len(noise)} Gaussian-noise "
            f"images:\n# p = {best.percentile:g}, lambda = {best.clip:.6g}"
            + (f" (the {best.clip_percentile:g}th percentile of training activations)" if best.clip_percentile else "")
            + f"; validation FPR95 {100 * best.fpr95:.2f}%, AUROC {100 * best.auroc:.2f}%.\n"
            + yaml.safe_dump(overlay, sort_keys=False)
        )
        atomic_write_text(folder / "tune_grid.csv", to_csv(grid))  # the grid first: an overlay never stands alone
        paths = [atomic_write_text(folder / "selected.yaml", text)]
        if output:
            paths.append(atomic_write_text(output, text))
        rank_zero_info(
            f"Selected p = {best.percentile:g}, lambda = {best.clip:.4g} (grid of {len(grid)} in {elapsed:.2f}s). "
            f"Overlay: {', '.join(map(str, paths))}; grid: {folder / 'tune_grid.csv'}. "
            f"Test with: lightning-ood test -c <config> -c {paths[-1]} --ckpt_path {ckpt_path}"
        )
        return {"percentile": best.percentile, "clip": best.clip, "fpr95": best.fpr95, "auroc": best.auroc,
                "overlay": str(paths[-1])}  # fmt: skip

    @staticmethod
    def _print_grid(grid, best) -> None:
        clips = sorted({c.clip for c in grid})
        table = Table(title="tune: validation FPR95 % (AUROC %) of fmls, ID validation vs Gaussian noise")
        table.add_column("p \\ lambda")
        for clip in clips:
            q = next(c.clip_percentile for c in grid if c.clip == clip)
            table.add_column(f"{clip:.3g}" + (f"\n(q{q:g})" if q is not None else ""), justify="right")
        for p in sorted({c.percentile for c in grid}):
            cells = []
            for clip in clips:
                c = next(c for c in grid if c.percentile == p and c.clip == clip)
                cell = f"{100 * c.fpr95:.1f} ({100 * c.auroc:.1f})"
                cells.append(f"[bold green]{cell}[/]" if c == best else cell)
            table.add_row(f"{p:g}", *cells)
        Console().print(table)

    def sweep(
        self,
        model: OODClassifier,
        datamodule: OODDataModule,
        ckpt_path: str | None = None,
        lambdas: list[float] | None = None,
        lambda_percentiles: list[float] = list(SWEEP_LAMBDA_PERCENTILES),  # noqa: B006
        percentiles: list[float] = list(SWEEP_PERCENTILES),  # noqa: B006
        cache_dir: str = "cache/features",
    ) -> dict:
        """Sensitivity of ``fmls`` (and LINE / ReAct) to lambda and to p on every OOD set of the test loaders.

        Args:
            model: the model (from the config); its ``fmls`` and ``line`` hyperparameters are the fixed ones.
            datamodule: the data (from the config); its test sets are swept.
            ckpt_path: the checkpoint.
            lambdas: absolute lambdas; when unset, lambda runs over ``lambda_percentiles`` of the training activations.
            lambda_percentiles: lambdas as percentiles of the training activations.
            percentiles: masking percentiles p.
            cache_dir: feature cache folder.

        Returns:
            ``{"csv": path, "figures": [paths], "seconds": time of the sweep on cached features}``.
        """
        check_grid("lambdas", lambdas, high=None)
        check_grid("lambda_percentiles", lambda_percentiles)
        check_grid("percentiles", percentiles)
        cache = FeatureCache(cache_dir)
        device = self._prepare(model, datamodule, ckpt_path, cache)
        if len(datamodule.test_sets) < 2:
            raise ConfigError("sweep needs OOD sets: set data.init_args.ood.")
        stats = model.ood_statistics
        weights = weights_fingerprint(model.backbone)
        batch = datamodule.eval_batch_size
        sets = {name: self._features(cache, model, name, dataset, device, weights, batch)
                for name, dataset in datamodule.test_sets.items()}  # fmt: skip
        id_name = datamodule.id_name
        oods = {name: data for name, data in sets.items() if name != id_name}
        specs = {name: params for name, params in model.scorer_specs.values()}
        fmls = specs.get("fmls", {})
        grid = lambdas or [stats.activation_percentile(q) for q in lambda_percentiles]
        start = time.perf_counter()
        points = with_average(sensitivity_sweeps(
            stats, copy.deepcopy(model.backbone.head).cpu(), sets[id_name], oods, grid, percentiles,
            percentile=fmls.get("percentile", 60.0), clip=fmls.get("clip", 1.0), line_params=specs.get("line"),
        ))  # fmt: skip
        elapsed = time.perf_counter() - start

        folder = self._log_dir()
        csv_path = atomic_write_text(folder / "sensitivity.csv", to_csv(points))
        figures = []
        tensorboard = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        for sweep, label in (("lambda", "lambda (ReAct threshold)"), ("percentile", "masking percentile p")):
            figure = sweep_figure(points, sweep, label)
            path = folder / f"sensitivity_{sweep}.png"
            figure.savefig(path)
            figures.append(path)
            if tensorboard is not None:
                tensorboard.experiment.add_figure(f"sensitivity/{sweep}", figure, close=True)
        if tensorboard is not None:
            tensorboard.experiment.flush()
        rank_zero_info(
            f"Sweep of {len(grid)} lambdas and {len(percentiles)} percentiles over {len(oods)} OOD sets on cached "
            f"features took {elapsed:.2f}s. Written: {csv_path}, {', '.join(map(str, figures))}."
        )
        return {"csv": str(csv_path), "figures": [str(f) for f in figures], "seconds": elapsed}

    def normratio(
        self,
        model: OODClassifier,
        datamodule: OODDataModule,
        ckpt_path: str | None = None,
        images: int = 2000,
        seed: int = 0,
        output: str | None = None,
    ) -> dict:
        """Choose the FeatureNorm block by NormRatio (Yu et al., CVPR 2023) on jigsaw-shuffled ID training images.

        Args:
            model: the model (from the config).
            datamodule: the data (from the config); its training images (test transform) are used.
            ckpt_path: the checkpoint.
            images: ID training images (a seeded subset).
            seed: seed of the subset and of the jigsaw permutations.
            output: also write the overlay (the configured scorers plus ``featurenorm`` on the chosen block) here.

        Returns:
            ``{"block": chosen block, "ratios": {block: NormRatio}, "overlay": path}``.
        """
        from lightning_ood.callbacks.statistics import normratio_selection

        check_output_file(output)
        if images < 1:
            raise ConfigError(f"normratio --images must be >= 1, got {images}.")
        self._load(model, datamodule, ckpt_path)
        result = normratio_selection(model, datamodule, None, images, seed)
        table = Table(title=f"NormRatio on {result.images} ID training images (ID / jigsaw FeatureNorm)")
        table.add_column("block")
        table.add_column("NormRatio", justify="right")
        for name, ratio in result.ratios.items():
            style = "bold green" if name == result.selected else ""
            table.add_row(f"[{style}]{name}[/]" if style else name, f"{ratio:.4f}")
        Console().print(table)
        folder = self._log_dir()
        atomic_write_text(folder / "normratio.csv", result.to_csv())
        figure = result.figure()
        figure.savefig(folder / "normratio.png")
        tensorboard = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            tensorboard.experiment.add_figure("normratio", figure, close=True)
            tensorboard.experiment.flush()
        scorers = {label: {"scorer": name, **params} for label, (name, params) in model.scorer_specs.items()}
        scorers["featurenorm"] = {"scorer": "featurenorm", "block": result.selected}
        text = (
            f"# Selected by `lightning-ood normratio` on {result.images} ID training images: FeatureNorm block "
            f"{result.selected} (NormRatio {result.ratios[result.selected]:.4f}).\n"
            + yaml.safe_dump({"model": {"scorers": scorers}}, sort_keys=False)
        )
        paths = [atomic_write_text(folder / "featurenorm.yaml", text)]
        if output:
            paths.append(atomic_write_text(output, text))
        rank_zero_info(
            f"FeatureNorm block: {result.selected}. Written: {folder / 'normratio.csv'}, {folder / 'normratio.png'}, "
            f"overlay {', '.join(map(str, paths))}."
        )
        return {"block": result.selected, "ratios": result.ratios, "overlay": str(paths[-1])}


def import_weights(
    self: OODTrainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    output: str,
    ckpt_path: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a Lightning checkpoint of ``model.weights`` (converted from its published format) with the OOD
    statistics fitted on the training images and the input normalisation the weights expect.

    ``lightning-ood test -c CONFIG --ckpt_path OUTPUT`` then evaluates it without converting or fitting again.

    Args:
        model: the model (from the config); ``model.weights`` names the published file.
        datamodule: the data (from the config); its training images give the OOD statistics.
        output: the checkpoint to write (``.ckpt``).
        ckpt_path: a Lightning checkpoint to take the weights from instead of ``model.weights``.
        overwrite: replace ``output`` when it exists.

    Returns:
        ``{"checkpoint": path, "seconds": time}``.
    """
    start = time.perf_counter()
    if model.hparams.weights is None and ckpt_path is None:
        raise ConfigError("import converts published weights: pass --model.weights <file>.")
    target = Path(output).expanduser()
    if target.is_dir() or str(output).endswith("/"):
        raise ConfigError(
            f"--output {output} is a folder; give the checkpoint file to write, e.g. {target / 'model.ckpt'}."
        )
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite true to replace it.")
    check_writable_folder(target.parent, "--output")
    self._load(model, datamodule, ckpt_path)
    model.ensure_statistics(datamodule, None)
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "imported_from": str(model.hparams.weights or ckpt_path),
    }
    model.on_save_checkpoint(checkpoint)
    atomic_write(target, lambda f: torch.save(checkpoint, f))
    elapsed = time.perf_counter() - start
    rank_zero_info(
        f"Wrote {target}: the weights of {checkpoint['imported_from']} with OOD statistics on "
        f"{model.ood_statistics.num_samples} training images and the normalisation "
        f"{model.input_normalization.describe()} ({elapsed:.1f}s). Evaluate it with: lightning-ood test -c <config> "
        f"--ckpt_path {target}"
    )
    return {"checkpoint": str(target), "seconds": elapsed}


setattr(OODTrainer, "import", import_weights)  # `import` is a Python keyword: the CLI subcommand is this method
