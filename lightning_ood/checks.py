"""Checks of user-given values (hyperparameters, seeds, counts): each refuses a bad value with one clear message
(:class:`~lightning_ood.errors.ConfigError`), never rounds or clamps it."""

from __future__ import annotations

import math

from lightning_ood.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seeds, and so Lightning's seed_everything: 0 .. 2^32 - 1


def check_number(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value != value):
        raise ConfigError(f"{name} must be a number, got {value!r}.")


def check_percentile(name: str, value: float | None) -> None:
    check_number(name, value)
    if value is not None and not 0.0 <= value <= 100.0:
        raise ConfigError(f"{name} must be a percentile in [0, 100], got {value}.")


def check_positive(name: str, value: float) -> None:
    check_number(name, value)
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}.")


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An integer setting (a count, a dimension, ``k``): a value with a fraction, a bool or a value below ``minimum``
    is refused, never rounded (a whole float such as ``50.0`` is its integer)."""
    check_number(name, value)
    if value is None or not math.isfinite(value) or value != int(value) or value < minimum:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)  # type: ignore[arg-type]


def check_seed(name: str, seed: object, also: str = "") -> int:
    """A seed: an integer in ``0..2^32 - 1`` (what numpy, and so ``seed_everything``, accepts; every seed of the
    project is held to it), naming the argument ``name``; ``also`` lists other accepted values."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer in 0..{SEED_MAX} (2^32 - 1){also}, got {seed!r}.")
    return seed


def check_nonnegative(name: str, value: float | None) -> None:
    check_number(name, value)
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}.")
