"""The detector table of the docs, generated from the scorer registry when the docs are built.

One row per registered name: the method, its paper and venue, what it reads beyond the features and logits, the
statistics it has fitted, its hyperparameters with their defaults, the test that checks it against an independent
reference, and how it differs from its authors' code. ``make docs`` writes it to ``docs/_generated/``;
``tests/docs/test_detector_table.py`` checks that every registered scorer has a complete row.
"""

from __future__ import annotations

import ast
import contextlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = Path(__file__).resolve().parents[1] / "_generated"  # included by docs/detectors.md
COLUMNS = ("name", "method", "paper")  # the summary table; every field in the detector's own section below it
FIELDS = ("reads", "fitted statistics", "hyperparameters (defaults)", "reference test", "differs from the authors")


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    paper: str
    reads: str
    statistics: str
    hyperparameters: str
    test: str
    differs: str

    @property
    def target(self) -> str:
        return f"detector-{self.name}"

    def cells(self) -> tuple[str, ...]:
        """The summary table's cells: the name (a link to its section), the method, the paper."""
        return f"{{ref}}`{self.name} <{self.target}>`", self.method, self.paper

    def fields(self) -> tuple[str, ...]:
        test = f"`{self.test}`" if self.test else ""
        return (self.reads, self.statistics, self.hyperparameters, test,
                self.differs or "none: it computes what the authors' code computes")  # fmt: skip

    def section(self) -> str:
        lines = [f"({self.target})=", f"### `{self.name}`", "", f"{self.method}. *{self.paper}.*", ""]
        lines += [f"- **{field}**: {value}" for field, value in zip(FIELDS, self.fields(), strict=True)]
        return "\n".join(lines) + "\n"


@cache
def _network():
    from lightning_ood.models import build_backbone

    return build_backbone("resnet18", 10)


def _needs(name: str):
    """The scorer's needs once bound to a CIFAR ResNet-18 (block names), unbound where binding needs more."""
    from lightning_ood.scoring.registry import build_scorer

    scorer = build_scorer(name)
    with contextlib.suppress(Exception):  # a scorer that binds only to other networks: its unbound declaration
        scorer = scorer.bind(_network())
    return scorer.needs


def _value(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        value = int(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")


def row(name: str) -> Row:
    from lightning_ood.scoring.registry import SCORERS, defaults

    entry = SCORERS[name]
    needs = _needs(name)
    reads = []
    if needs.inputs:
        reads.append("the input images (its own forward and backward passes)")
    if needs.blocks:
        reads.append("block outputs " + ", ".join(f"`{b}`" for b in needs.blocks))
    if needs.references:
        reads.append("ID reference images " + ", ".join(f"`{r}`" for r in sorted(needs.references)))
    statistics = ", ".join(f"`{s.name}`" for s in sorted(needs.statistics, key=lambda s: s.name))
    hyper = ", ".join(f"`{k}` ({_value(v)})" for k, v in defaults(name).items())
    method = entry.description + (f" (the paper's {entry.paper_name})" if entry.paper_name else "")
    return Row(name, method, entry.paper, "; ".join(reads) or "features, logits", statistics or "core",
               hyper or "none", entry.test, entry.differs)  # fmt: skip


def rows() -> list[Row]:
    from lightning_ood.scoring.registry import SCORERS

    return [row(name) for name in SCORERS]


def summary(table_rows: list[Row]) -> str:
    """The summary table: name (a link to its section), method, paper."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in table_rows]
    return "\n".join(lines) + "\n"


def sections(table_rows: list[Row]) -> str:
    """One section per detector with every field."""
    return "\n".join(r.section() for r in table_rows)


def markdown(table_rows: list[Row]) -> str:
    return summary(table_rows) + "\n" + sections(table_rows)


def test_exists(node: str) -> bool:
    """Whether ``node`` (``tests/<path>.py::test_name``) names a test function that exists."""
    path, _, function = node.partition("::")
    file = ROOT / path
    if not function or not path.startswith("tests/") or not file.is_file():
        return False
    return function in _test_functions(file)


@cache
def _test_functions(file: Path) -> frozenset[str]:
    tree = ast.parse(file.read_text())
    return frozenset(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))


def problems(table_rows: list[Row], registered) -> list[str]:
    """What makes the table incomplete: a registered scorer without a row, a row without a paper, or without a
    reference test that exists."""
    found = {r.name for r in table_rows}
    issues = [f"{name}: no row" for name in registered if name not in found]
    for r in table_rows:
        if not r.paper.strip():
            issues.append(f"{r.name}: no paper")
        if not r.test:
            issues.append(f"{r.name}: no reference test")
        elif not test_exists(r.test):
            issues.append(f"{r.name}: reference test {r.test} does not exist")
    return issues


def write(folder: Path = GENERATED) -> list[Path]:
    """Write ``detector_table.md`` (the summary) and ``detector_sections.md`` into ``folder``; a file whose text is
    unchanged is not touched (Sphinx then does not rebuild the page)."""
    folder.mkdir(parents=True, exist_ok=True)
    table_rows = rows()
    written = []
    for name, text in (("detector_table.md", summary(table_rows)), ("detector_sections.md", sections(table_rows))):
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def _on_builder_inited(app) -> None:
    write()


def setup(app):
    app.connect("builder-inited", _on_builder_inited)
    return {"version": "1", "parallel_read_safe": True}
