"""The docs' detector table is generated from the registry: a registered scorer without a row, a paper or a reference
test that exists fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lightning_ood.scoring import registry
from lightning_ood.scoring.output import MSP

EXT = Path(__file__).resolve().parents[2] / "docs" / "_ext" / "detector_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("detector_table", EXT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["detector_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(table):
    return table.rows()


def test_every_registered_scorer_has_a_row_a_paper_and_a_reference_test(table, rows):
    assert [r.name for r in rows] == list(registry.SCORERS)  # one row each, in the registry's order
    assert table.problems(rows, registry.SCORERS) == []


def test_the_page_holds_every_row(table, rows):
    text = table.markdown(rows)
    lines = text.splitlines()
    summary = lines[2 : 2 + len(registry.SCORERS)]
    assert lines[2 + len(registry.SCORERS)] == ""  # the table ends after one row per scorer
    for r, line in zip(rows, summary, strict=True):
        assert line.startswith(f"| {{ref}}`{r.name} <detector-{r.name}>` | ") and line.endswith(f" | {r.paper} |")
        assert line.count(" | ") == len(table.COLUMNS) - 1  # no cell broke the table
        section = text[text.index(f"({r.target})=\n### `{r.name}`") :]
        section = section[: section.index("\n\n(") if "\n\n(" in section else None]
        for field, value in zip(table.FIELDS, r.fields(), strict=True):
            assert f"- **{field}**: {value}" in section, (r.name, field)
        assert f"`{r.test}`" in section


def test_a_scorer_registered_without_paper_or_test_is_reported(table, rows, monkeypatch):
    assert table.problems(rows[1:], registry.SCORERS) == [f"{rows[0].name}: no row"]
    monkeypatch.setitem(registry.SCORERS, "msp_unsourced", registry.Entry(MSP, {}, "MSP again"))
    monkeypatch.setitem(
        registry.SCORERS, "msp_bad_test", registry.Entry(MSP, {}, "MSP", paper="x", test="tests/no.py::t")
    )
    found = table.problems([*rows, table.row("msp_unsourced"), table.row("msp_bad_test")], registry.SCORERS)
    assert found == [
        "msp_unsourced: no paper",
        "msp_unsourced: no reference test",
        "msp_bad_test: reference test tests/no.py::t does not exist",
    ]
