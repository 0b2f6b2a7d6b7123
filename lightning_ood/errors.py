"""User-facing errors: one clear message, no traceback, non-zero exit (see ``cli.main``)."""


class LightningOODError(Exception):
    """A problem with the user's input (config, data, checkpoint) that the message alone explains."""


class ConfigError(LightningOODError, ValueError):
    """An unknown name or an invalid value in the configuration."""


class DataError(LightningOODError, FileNotFoundError):
    """Data that is missing, unreadable or laid out differently from what was expected."""


class CheckpointError(LightningOODError):
    """A checkpoint that is missing, corrupt or does not fit the configured model."""


def unknown_name(kind: str, name: str, choices) -> ConfigError:
    """Build the error for a name that is not registered, listing the valid ones."""
    return ConfigError(f"Unknown {kind} {name!r}. Choose one of: {', '.join(sorted(choices))}.")


class OutputError(LightningOODError):
    """A result, checkpoint, log or cache file that cannot be written (full disk, read-only folder, quota)."""


class DuplicateKeyError(LightningOODError):
    """A YAML mapping (config file or command-line value) that gives one key twice. Deliberately not a ``ValueError``:
    jsonargparse would take that as "not YAML" and read the value as a plain string."""


class FitError(LightningOODError, ValueError):
    """A scorer that cannot be fitted on what it was given: fewer training images than its fit needs, a covariance
    that is zero up to rounding, a setting its statistics cannot honour (``k`` beyond the bank). Raised instead of
    scoring noise; the evaluation engine puts the scorer's label in front of the message."""
