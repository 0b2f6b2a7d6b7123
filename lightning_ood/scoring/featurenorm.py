"""FeatureNorm as a scorer, and NormRatio block selection (Yu et al., "Block Selection Method for Using Feature Norm in
Out-of-Distribution Detection", CVPR 2023).

- FeatureNorm of a block output ``z`` (N, C, H, W): ``mean_c || ReLU(z)[n, c] ||_2`` (the spatial L2 norm of each
  channel, averaged over channels); higher = more in-distribution. Token outputs (N, T, D) of a transformer block use
  the tokens as the spatial axis.
- Jigsaw pseudo-OOD, as the authors make it (gist-ailab/block-selection-for-OOD-detection, ``utils/dataset.py``):
  the image's pixels in [0, 1] cut into a 3x3 grid of ``floor(H/3) x floor(W/3)`` tiles (the authors' ``floor(H/3)``
  square tiles on the square images of every pipeline here), shuffled; the strip the grid does not cover stays 0.
  (The authors draw the permutation unseeded per image; here it is seeded by the image's index, so the ratio is
  reproducible and the same under DDP.)
- The inputs, as the authors feed them (``get_cifar_jigsaw`` loads both the ID and the jigsaw images with
  ``Resize + ToTensor`` and no ``Normalize``; ``normratio.py`` passes them to the network as they are): the pixels in
  [0, 1], NOT normalised, the ID images as well as their jigsaws, although the network was trained, and is tested,
  on normalised inputs. NormRatio is therefore measured on inputs off the training distribution; we follow them, since
  the block it selects is the method. Without a known normalisation the images are taken as given.
- The images: the authors use every ID training image (the full CIFAR-10 training set, 50,000, in order); so does
  FeatureNorm's selection (in a test, or ``lightning-ood tune --scorer featurenorm``) by default, and
  ``normratio_images: N`` takes a seeded subset of N instead.
- NormRatio of a block: the mean over ID training images of ``FeatureNorm(x) / FeatureNorm(jigsaw(x))``; the block
  with the largest ratio separates real images from scrambled ones best and is selected.

Block outputs are read with forward hooks: no backbone code changes, and the penultimate features come from the same
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from rich.table import Table
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.features import network_pass
from lightning_ood.hooks import unknown_blocks
from lightning_ood.normalization import Normalization
from lightning_ood.precision import as_float, network_device, network_dtype
from lightning_ood.scoring.base import Batch, Scorer, Tuning, check_seed

NORMRATIO_IMAGES: int | None = None  # training images that choose the block: None all (the authors), N a seeded subset


class FeatureNorm(Scorer):
    """Channel-average of the spatial L2 norms of ``ReLU(block output)``; higher = more in-distribution.

    ``block`` names one of ``backbone.blocks()``; ``None`` lets the test pass choose it by NormRatio on jigsaw-shuffled
    ID training images, un-normalised as the authors feed them (see the module docstring): all of them, as the
    authors, or a seeded subset of ``normratio_images`` (``lightning-ood tune --scorer featurenorm`` does the same
    once and writes the choice as a config overlay, with the ratios). The module reads the block's output with a
    forward hook during the same forward pass as the penultimate features.

    Args:
        block: the block whose output is scored; ``None``: chosen by NormRatio.
        normratio_images: the ID training images NormRatio is measured on: ``None`` all (the authors'), N a seeded
            subset.
        normratio_seed: the seed of that subset and of the jigsaw permutations.
    """

    tuning: ClassVar[Tuning] = Tuning(prepared=("block",))  # tune: its block, by NormRatio (prepare)

    def __init__(
        self, block: str | None = None, normratio_images: int | None = NORMRATIO_IMAGES, normratio_seed: int = 0
    ) -> None:
        super().__init__()
        if normratio_images is not None and (
            isinstance(normratio_images, bool) or not isinstance(normratio_images, int) or normratio_images < 1
        ):
            raise ConfigError(
                f"featurenorm normratio_images must be a count >= 1, or none (every training image, as the authors); "
                f"got {normratio_images!r}."
            )
        self.block = block
        self.normratio_images = normratio_images
        self.normratio_seed = check_seed("normratio_seed", normratio_seed)

    def bind(self, backbone: nn.Module) -> FeatureNorm:
        if self.block is not None and unknown_blocks([self.block], backbone.blocks(), dict(backbone.named_modules())):
            raise ConfigError(
                f"featurenorm block {self.block!r} is not a block of {type(backbone).__name__}: one of "
                f"{', '.join(backbone.blocks())}, or none (NormRatio chooses)."
            )
        return self

    def prepare(self, context) -> FeatureNorm:
        """With no block configured, choose it by NormRatio on the ID training images, all or a seeded subset of
        ``normratio_images`` (one measurement per run and count, shared by the FeatureNorm scorers of the run)."""
        if self.block is not None:
            return self
        if context is None or context.training_images is None:
            raise ConfigError(
                "featurenorm without a block chooses one by NormRatio on ID training images, which this run does not "
                "have: name the block ({scorer: featurenorm, block: <name>}, or choose it with `lightning-ood tune "
                "--scorer featurenorm`)."
            )

        images, seed = self.normratio_images, self.normratio_seed

        def measure() -> NormRatios:
            result = norm_ratios(
                context.backbone, context.training_images(images, seed), seed=seed, sum_across=context.sum_across,
                normalization=context.normalization,
            )  # fmt: skip
            table = ", ".join(f"{name} {ratio:.3f}" for name, ratio in result.ratios.items())
            context.log(
                f"NormRatio on {result.images} ID training images: {table}. FeatureNorm block: {result.selected}."
            )
            return result

        self.preparation = context.shared(f"normratio:{images}:{seed}", measure)
        self.block = self.preparation.selected
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return (self.block,) if self.block is not None else ()

    def forward(self, batch: Batch) -> Tensor:  # {block: map} -> (N,)
        if self.block is None:
            raise ConfigError("featurenorm has no block: name one, or let NormRatio choose it (prepare).")
        return feature_norm(batch.blocks[self.block])


def feature_norm(output: Tensor) -> Tensor:  # (N, C, H, W) or (N, T, D) -> (N,)
    """Channel-average of the spatial L2 norms of ``ReLU(output)``."""
    z = as_float(output).relu()  # at least float32: half-precision maps widened, float64 ones kept
    if z.ndim == 4:
        return z.flatten(2).norm(dim=2).mean(dim=1)  # (N, C, H*W) -> (N, C) -> (N,)
    if z.ndim == 3:
        return z.norm(dim=1).mean(dim=1)  # tokens (N, T, D): norm over T per feature, mean over D
    raise ValueError(f"FeatureNorm needs (N, C, H, W) or (N, T, D) block outputs, got shape {tuple(output.shape)}")


def jigsaw(images: Tensor, generators: Iterable[torch.Generator], grid: int = 3) -> Tensor:
    """Each image's ``grid x grid`` tiles, shuffled by its own generator; the uncovered border stays 0."""
    n, _, h, w = images.shape
    th, tw = h // grid, w // grid
    out = torch.zeros_like(images)
    for i, generator in zip(range(n), generators, strict=True):
        tiles = [images[i, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(grid) for c in range(grid)]
        order = torch.randperm(grid * grid, generator=generator).tolist()
        for position, source in enumerate(order):
            r, c = divmod(position, grid)
            out[i, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tiles[source]
    return out


@dataclass
class NormRatios:
    """NormRatio per block (forward order) on ``images`` ID training images, and the selected block."""

    ratios: dict[str, float]
    images: int
    name: str = "normratio"  # the files tune writes it to: normratio.csv, normratio.png

    @property
    def selected(self) -> str:
        return max(self.ratios, key=self.ratios.get)

    def table(self) -> Table:
        table = Table(title=f"NormRatio on {self.images} ID training images (ID / jigsaw FeatureNorm)")
        table.add_column("block")
        table.add_column("NormRatio", justify="right")
        for name, ratio in self.ratios.items():
            style = "bold green" if name == self.selected else ""
            table.add_row(f"[{style}]{name}[/]" if style else name, f"{ratio:.4f}")
        return table

    def to_csv(self) -> str:
        rows = [f"{name},{ratio:.6f},{int(name == self.selected)}" for name, ratio in self.ratios.items()]
        return "block,norm_ratio,selected\n" + "\n".join(rows) + "\n"

    def figure(self, title: str = "NormRatio per block (ID / jigsaw FeatureNorm)"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.ratios)
        figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(names)), 3.2), dpi=100)
        colours = ["tab:red" if n == self.selected else "tab:blue" for n in names]
        axis.bar(range(len(names)), [self.ratios[n] for n in names], color=colours)
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_ylabel("NormRatio")
        axis.set_title(f"{title}: {self.selected}", fontsize=9)
        figure.tight_layout()
        return figure


@torch.inference_mode(False)
@torch.no_grad()
def norm_ratios(
    backbone: nn.Module,
    loader: Iterable,
    blocks: Iterable[str] | None = None,
    seed: int = 0,
    sum_across: Callable[[Tensor], Tensor] | None = None,
    normalization: Normalization | None = None,
) -> NormRatios:
    """NormRatio of every block (default: all of ``backbone.blocks()``) over ``loader``'s ``(image, label, index)``
    batches of images normalised by ``normalization``. As the authors do, the network sees the pixels in [0, 1]
    (``normalization.unnormalize``), the ID images and their jigsaws alike; with no ``normalization`` the images are
    taken as given. Each image's jigsaw is seeded by ``seed`` and its dataset index, so the result does not depend
    on batching or on the number of DDP ranks (``sum_across`` adds the per-rank sums). On the network's device and
    in its precision (the one forward loop, :func:`~lightning_ood.features.network_pass`, with the jigsaw images run
    through the same hooks)."""
    names = list(blocks) if blocks is not None else list(backbone.blocks())
    totals = torch.zeros(len(names), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    if normalization is not None:
        loader = _as_pixels(loader, normalization)
    for _, _, captured, (images, _, indices) in network_pass(backbone, loader, names, "NormRatio", progress=False):
        real = torch.stack([feature_norm(captured[n]) for n in names], dim=1).double().cpu()  # (N, B)
        images = images.to(network_device(backbone), network_dtype(backbone))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]
        backbone.features(jigsaw(images, generators))  # the same hooks, still in place: the jigsaw's block outputs
        scrambled = torch.stack([feature_norm(captured[n]) for n in names], dim=1).double().cpu()
        totals += (real / scrambled.clamp_min(1e-12)).sum(0)
        count += len(images)
    if sum_across is not None:
        totals, count = sum_across(totals), sum_across(count)
    ratios = (totals / count).tolist()
    return NormRatios(dict(zip(names, ratios, strict=True)), int(count))


def _as_pixels(loader: Iterable, normalization: Normalization) -> Iterator[tuple]:
    """``loader``'s batches with the images back in pixels, [0, 1] (float32, before they reach the network)."""
    for images, *rest in loader:
        yield (normalization.unnormalize(images.float()), *rest)
