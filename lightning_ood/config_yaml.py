"""Strict YAML for configs and command-line values: a mapping that gives one key twice is refused.

PyYAML keeps the last of two equal keys, so ``{a: {scorer: msp}, a: {scorer: energy}}`` would silently drop ``msp``
(the list form of ``--model.scorers`` already refuses repeats). :func:`install` makes jsonargparse, and so the CLI,
load every config file and value through :func:`strict_yaml_load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

from lightning_ood.errors import DuplicateKeyError


class StrictLoader(get_yaml_default_loader()):
    """jsonargparse's safe loader, refusing a repeated key in any mapping."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                one_line = "\n" not in self.text.strip()
                where = f"in {self.text.strip()}" if one_line else f"lines {first_line[key]} and {line} of a config"
                raise DuplicateKeyError(
                    f"The key {key!r} appears twice in one YAML mapping ({where}); the second would silently replace "
                    f"the first. Give each key once (rename one of them)."
                )
            first_line.setdefault(key, line)
        return super().construct_mapping(node, deep)


def strict_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader, after checking that no mapping repeats a key."""
    if isinstance(stream, str) and ":" in stream:  # only mappings can repeat a key
        loader = StrictLoader(stream)
        try:
            loader.get_single_data()
        except yaml.YAMLError:
            pass  # not YAML: jsonargparse's own loader says so (or reads it as a string)
        finally:
            loader.dispose()
    return yaml_load(stream)


def check_config_files(argv: list[str]) -> None:
    """Check the config files named by ``-c`` / ``--config`` in ``argv`` before jsonargparse reads them, so a
    repeated key is reported with the file's name."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg in ("-c", "--config") and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or not Path(path).is_file():
            continue  # jsonargparse reports a missing file itself
        try:
            strict_yaml_load(Path(path).read_text())
        except DuplicateKeyError as err:
            raise DuplicateKeyError(f"{path}: {err}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue


def install() -> None:
    """Make jsonargparse load YAML through :func:`strict_yaml_load` (idempotent)."""
    jsonargparse.set_loader("yaml", strict_yaml_load, (yaml.YAMLError,))
