"""Feature extraction with an on-disk cache: extract once, score many times.

A cache entry holds the penultimate features, logits and labels of one dataset under one set of weights and one
transform. Its key is a hash of the three (weights: every backbone tensor; dataset: its files with sizes and
modification times, or its in-memory content; transform: its ``repr``), so changing any of them selects another entry
and a stale one is never read. The JSON beside each entry holds the entry's name, its key and the SHA-256 of its bytes:
an entry that was changed or damaged on disk, or whose JSON is another entry's (a pair of files copied or renamed
over it), is recomputed, with a warning, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_ood.errors import DataError
from lightning_ood.hooks import block_outputs
from lightning_ood.io import atomic_write, check_writable_folder
from lightning_ood.precision import as_float, network_device, network_dtype
from lightning_ood.statistics import FeatureSet


# ------------------------------------------------------------------------------------------------ fingerprints
def weights_fingerprint(module: nn.Module, extra: str = "") -> str:
    """SHA-256 of every tensor (parameters and buffers) of ``module``, with their names (and ``extra``: what else the
    result depends on, such as the input normalisation)."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def files_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _array_digest(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = array.numpy() if isinstance(array, Tensor) else np.asarray(array)
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """What identifies the images of ``dataset``: its files (path, size, mtime) or its in-memory content."""
    kind = type(dataset).__name__
    if isinstance(dataset, Subset):
        return f"Subset({dataset_fingerprint(dataset.dataset)}, {_array_digest(np.asarray(dataset.indices))})"
    if isinstance(dataset, TensorDataset):
        return f"{kind}({_array_digest(*dataset.tensors)})"
    if hasattr(dataset, "paths"):  # ImageFiles
        return f"{kind}({files_digest(dataset.paths)})"
    if hasattr(dataset, "samples"):  # torchvision ImageFolder
        return f"{kind}({files_digest(p for p, _ in dataset.samples)})"
    if hasattr(dataset, "targets_tensor"):  # DecodedImages (the tensor pipeline): images and labels
        return f"{kind}({_array_digest(dataset.images, dataset.targets_tensor)})"
    if hasattr(dataset, "images"):  # ArrayImages, LabelledArrays
        return f"{kind}({_array_digest(dataset.images)})"
    if hasattr(dataset, "data"):  # torchvision CIFAR, SVHN, MNIST
        return f"{kind}({_array_digest(dataset.data)})"
    if hasattr(dataset, "seed") and hasattr(dataset, "size"):  # NoiseImages
        return f"{kind}({sorted((k, str(v)) for k, v in vars(dataset).items())})"
    if hasattr(dataset, "dataset"):  # wrappers (OODLabels, IndexedDataset)
        return f"{kind}({dataset_fingerprint(dataset.dataset)})"
    first, last = dataset[0][0], dataset[len(dataset) - 1][0]
    return f"{kind}(n={len(dataset)}, {_array_digest(first, last)})"


def transform_fingerprint(dataset: Dataset) -> str:
    """``repr`` of the transform applied to the images (found through wrappers)."""
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return repr(getattr(dataset, "transform", None))


# ------------------------------------------------------------------------------------------------ extraction
def network_batches(
    backbone: nn.Module,
    loader: Iterable,
    description: str = "",
    progress: bool = True,
    total: int | None = None,
) -> Iterator[tuple[Tensor, tuple]]:
    """The one loop over images: ``(images, batch)`` for each batch of ``loader``, the images moved to the network's
    device and dtype, the network in eval mode (restored afterwards), a progress bar. :func:`network_pass` runs the
    network on them; methods that need input gradients run their own passes on them (in their fits)."""
    was_training = backbone.training
    backbone.eval()
    device, dtype = network_device(backbone), network_dtype(backbone)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task(description or "Network pass", total=total if total is not None else _length(loader))
            for batch in loader:
                yield batch[0].to(device, dtype, non_blocking=True), batch
                bar.advance(task)
    finally:
        backbone.train(was_training)


@torch.inference_mode(False)
@torch.no_grad()
def network_pass(
    backbone: nn.Module,
    loader: Iterable,
    blocks: Sequence[str] = (),
    description: str = "",
    progress: bool = True,
    total: int | None = None,
    subject: str = "images",
) -> Iterable[tuple[Tensor, Tensor, dict[str, Tensor], tuple]]:
    """The forward pass over ``loader`` (:func:`network_batches`), NaN/inf features refused. Yields ``(features,
    logits, block outputs, batch)`` with the features at least float32 and ``batch`` the loader's items
    (``(images, labels[, indices])``).

    Outside inference mode, so that what is computed from the features can serve an autograd pass later (ODIN).
    """
    dtype = network_dtype(backbone)
    with block_outputs(backbone, blocks) as out:
        for images, batch in network_batches(backbone, loader, description, progress, total):
            features = as_float(backbone.features(images))
            if not torch.isfinite(features).all():
                broken = int((~torch.isfinite(features).all(dim=1)).sum())
                where = f" {batch[2][:5].tolist()}..." if len(batch) > 2 else ""
                raise DataError(
                    f"{description or 'Network pass'}: NaN or infinite penultimate features on {subject}{where} "
                    f"({broken} of {len(features)} images of a batch): the weights or the inputs are broken, and "
                    f"every statistic and score would be meaningless."
                )
            logits = as_float(backbone.head(features.to(dtype)))
            yield features, logits, out, batch


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.inference_mode(False)
@torch.no_grad()
def measure(backbone: nn.Module, loader: Iterable, description: str = "", progress: bool = True) -> FeatureSet:
    """Features, logits and labels of every item of ``loader``, in the loader's order (on the CPU)."""
    features, logits, labels = [], [], []
    for h, z, _, batch in network_pass(backbone, loader, description=description, progress=progress):
        features.append(h.cpu())
        logits.append(z.cpu())
        labels.append(torch.as_tensor(batch[1]).cpu())
    if not features:
        raise DataError(f"{description or 'Network pass'}: no images.")
    return FeatureSet(torch.cat(features), torch.cat(logits), torch.cat(labels))


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    description: str = "Extracting features",
    progress: bool = True,
) -> FeatureSet:
    """Penultimate features, logits and labels of every item of ``dataset`` (in order), the model in eval mode, on
    the network's own device (``device`` is where it is: the pass never moves it)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    return measure(backbone, loader, description, progress)


class FeatureCache:
    """Feature sets on disk under ``folder``, keyed by (weights, dataset, transform)."""

    def __init__(self, folder: str | Path = "cache/features") -> None:
        self.folder = Path(folder).expanduser()

    def check(self, what: str) -> None:
        """Refuse, before any work, a cache folder that cannot be written (a file, under a file, read-only, on a full
        disk), naming the argument ``what`` (``--cache_dir``) that sets it."""
        check_writable_folder(self.folder, what)

    def key(self, weights: str, dataset: str, transform: str) -> str:
        return hashlib.sha256(f"{weights}\n{dataset}\n{transform}".encode()).hexdigest()[:24]

    def path(self, name: str, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.folder / f"{safe}-{key}.pt"

    def get(
        self,
        name: str,
        backbone: nn.Module,
        dataset: Dataset,
        weights: str | None = None,
        **extract_kwargs,
    ) -> tuple[FeatureSet, bool]:
        """The cached features of ``dataset`` under ``backbone``'s weights, extracting them on a miss.

        Returns the feature set and whether it came from the cache.
        """

        def extract() -> dict:
            result = extract_features(backbone, dataset, description=f"Extracting features: {name}", **extract_kwargs)
            return {"features": result.features, "logits": result.logits, "labels": result.labels}

        stored, hit = self.get_or_compute(name, self.dataset_key(backbone, dataset, weights), extract)
        return FeatureSet(stored["features"], stored["logits"], stored["labels"]), hit

    def dataset_key(self, backbone: nn.Module, dataset: Dataset, weights: str | None = None) -> str:
        weights = weights or weights_fingerprint(backbone)
        return self.key(weights, dataset_fingerprint(dataset), transform_fingerprint(dataset))

    def load(self, name: str, key: str) -> dict | None:
        """The stored tensors of ``(name, key)``, or ``None``: an entry that is unreadable, has no checksum, does not
        match it, or whose JSON names another entry (another name or key) is removed (and recomputed by the caller),
        with a warning."""
        path = self.path(name, key)
        if not path.is_file():
            return None
        meta_path = path.with_suffix(".json")
        try:
            data = path.read_bytes()
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        meta = meta if isinstance(meta, dict) else {}
        expected = meta.get("sha256")
        if expected is None or hashlib.sha256(data).hexdigest() != expected:
            warnings.warn(f"Cache entry {path} does not match its checksum: recomputing it.", stacklevel=2)
            self.remove(path)
            return None
        if (meta.get("name"), meta.get("key")) != (name, key):
            warnings.warn(
                f"Cache entry {path}: its checksum file {meta_path.name} belongs to another entry (name "
                f"{meta.get('name')!r}, key {meta.get('key')!r}; this one: {name!r}, key {key!r}), so its tensors "
                f"are that entry's: recomputing it.",
                stacklevel=2,
            )
            self.remove(path)
            return None
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # a foreign file with a matching checksum: recompute and replace
            self.remove(path)
            return None

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def store(self, name: str, key: str, payload: dict) -> Path:
        """Write ``payload`` (a dict of tensors and plain values) atomically, with a JSON summary and the SHA-256 of
        the entry's bytes beside it."""
        path = self.path(name, key)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        atomic_write(path, lambda f: f.write(data))
        shapes = {k: list(v.shape) for k, v in payload.items() if hasattr(v, "shape")}
        meta = {"name": name, "key": key, "tensors": shapes, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return path

    def get_or_compute(self, name: str, key: str, compute) -> tuple[dict, bool]:
        """The stored tensors of ``(name, key)``, or ``compute()``'s, stored atomically; and whether it was a hit."""
        stored = self.load(name, key)
        if stored is not None:
            return stored, True
        payload = compute()
        self.store(name, key, payload)
        return payload, False
