"""Strict YAML for configs and command-line values: a mapping that gives one key twice is refused, and so is a document
that expands beyond a sane size once its aliases are expanded.

PyYAML keeps the last of two equal keys, so ``{a: {scorer: msp}, a: {scorer: energy}}`` would silently drop ``msp``
(the list form of ``--model.scorers`` already refuses repeats). Aliases (``*name``) share one parsed value, so a few
hundred bytes of nested aliases (a "billion laughs") parse at once but expand to gigabytes wherever the value is
copied or printed (jsonargparse's error messages print it): the size after expansion is counted on the parsed node
graph, without expanding it, and refused above :data:`MAX_NODES` values or :data:`MAX_CHARACTERS` characters.
:func:`install` makes jsonargparse, and so the CLI, load every config file and value through :func:`strict_yaml_load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from jsonargparse._loaders_dumpers import get_yaml_default_loader, yaml_load

from lightning_ood.errors import DuplicateKeyError, LightningOODError

MAX_NODES = 100_000  # values (scalars, lists, mappings) of one document after its aliases are expanded
MAX_CHARACTERS = 4_000_000  # characters of its scalars after expansion


class OversizedYAMLError(LightningOODError):
    """A config or command-line value that expands beyond :data:`MAX_NODES` values or :data:`MAX_CHARACTERS`
    characters, or holds an alias inside its own anchor. Not a ``ValueError``, as :class:`DuplicateKeyError`."""


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


def expanded_size(root: yaml.Node) -> tuple[int, int] | None:
    """``(values, scalar characters)`` of the document ``root`` once every alias is expanded, counted on the node
    graph (an alias is the anchored node itself) in one pass over its distinct nodes; ``None`` when an alias lies
    inside its own anchor (an endless value)."""
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()  # entered, not finished: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = (1, len(str(node.value)))
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if finished:
            open_nodes.discard(id(node))
            counted = [sizes[id(child)] for child in children]
            sizes[id(node)] = (1 + sum(c[0] for c in counted), sum(c[1] for c in counted))
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return None
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def check_size(node: yaml.Node | None, text: str) -> None:
    """Refuse a document that expands beyond :data:`MAX_NODES` values or :data:`MAX_CHARACTERS` characters, or
    that holds an alias inside its own anchor."""
    if node is None:
        return
    size = expanded_size(node)
    one_line = "\n" not in text.strip()
    where = f"The YAML value {shortened(text.strip(), 60)!r}" if one_line else "The YAML"
    if size is None:
        raise OversizedYAMLError(
            f"{where} holds an alias inside its own anchor (&name ... *name), an endless value. Write the value out."
        )
    values, characters = size
    if values > MAX_NODES or characters > MAX_CHARACTERS:
        raise OversizedYAMLError(
            f"{where} expands to {values:,} values ({characters:,} characters) once its aliases (*name) are "
            f"expanded; more than {MAX_NODES:,} values or {MAX_CHARACTERS:,} characters is refused (nested aliases: a "
            f"'billion laughs'). Write the values out, or nest fewer aliases."
        )


def shortened(text: str, limit: int) -> str:
    """``text`` cut after ``limit`` characters, with an ellipsis and the count of those left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def strict_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader, after checking the size of the document once its aliases are expanded and that
    no mapping repeats a key."""
    if isinstance(stream, str):
        if len(stream) > MAX_CHARACTERS:
            raise OversizedYAMLError(
                f"The YAML is {len(stream):,} characters long; more than {MAX_CHARACTERS:,} is refused. Give a "
                f"smaller config."
            )
        loader = StrictLoader(stream)
        try:
            node = loader.get_single_node()
            check_size(node, stream)
            if node is not None and ":" in stream:  # only mappings can repeat a key
                loader.construct_document(node)
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
        except (DuplicateKeyError, OversizedYAMLError) as err:
            raise type(err)(f"{path}: {err}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue


def install() -> None:
    """Make jsonargparse load YAML through :func:`strict_yaml_load` (idempotent)."""
    jsonargparse.set_loader("yaml", strict_yaml_load, (yaml.YAMLError,))
