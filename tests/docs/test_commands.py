"""Every command block of the README and the docs is checked as a user meets it: ``docs-test: run`` blocks run as
written, ``docs-test: parse`` blocks have each ``lightning-ood`` command parsed by the CLI (``--print_config``: a
renamed flag, subcommand or config file fails) and each ``make`` target looked up in the Makefile, and
``docs-test: skip: <reason>`` says why a block is not run. A block without a mark fails."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from lightning_ood.cli import main
from lightning_ood.commands.report import report_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "_generated"} & set(p.parts)),
]
FENCE = re.compile(r"(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>[a-z]+)\n(?P<code>.*?)```", re.S)
PLACEHOLDERS = {"CONFIG": "configs/cifar10_resnet18.yaml", "CKPT": "checkpoints/cifar10_resnet18/last.ckpt"}
RUNNABLE = {"bash", "console", "python"}


def blocks():
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] in RUNNABLE:
                line = text[: match.start("code")].count("\n") + 1
                yield pytest.param(match["lang"], match["mark"], match["code"], id=f"{page.relative_to(ROOT)}:{line}")


def commands(code: str) -> list[list[str]]:
    """The shell lines of a block, continuations joined, comments dropped, placeholders filled."""
    joined = re.sub(r"\\\n\s*", " ", code)
    found = []
    for line in joined.splitlines():
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(line, comments=True)]
        if words:
            found.append(words)
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z0-9_-]+):.*## ", (ROOT / "Makefile").read_text(), re.M))


def check_parses(words: list[str], made: dict[str, Path]) -> None:
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        assert targets and set(targets) <= make_targets(), f"{shlex.join(words)}: no such documented make target"
        return
    if words[0] != "lightning-ood":
        return
    if words[1] == "report":
        report_parser().parse_args(words[2:])
        return
    words = [str(made.get(w, w)) for w in words]  # a file an earlier line of the block writes (--output)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main([*words[1:], "--print_config"])
    assert exit_.value.code in (0, None), f"{shlex.join(words)}:\n{err.getvalue()[-2000:]}"
    assert "trainer:" in out.getvalue()


@pytest.mark.parametrize(("lang", "mark", "code"), list(blocks()))
def test_every_command_block(lang, mark, code, tmp_path, monkeypatch):
    assert mark, "mark the block <!-- docs-test: run | parse | skip: <reason> --> (see docs/development.md)"
    if mark.startswith("skip:"):
        assert len(mark) > len("skip: ") + 10, "say why the block is not run"
        return
    if mark == "run" and lang == "python":
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "<docs>", "exec"), {"__name__": "docs_example"})
        return
    assert mark == "parse" and lang in ("bash", "console"), f"unknown mark {mark!r} for a {lang} block"
    monkeypatch.chdir(ROOT)  # configs/ and the Makefile as the docs name them
    monkeypatch.setattr("sys.argv", ["lightning-ood"])
    lines = commands(code)
    assert lines
    made: dict[str, Path] = {}
    for words in lines:
        check_parses(words, made)
        if "--output" in words and words[words.index("--output") + 1].endswith(".yaml"):
            name = words[words.index("--output") + 1]
            made[name] = tmp_path / name
            made[name].write_text("seed_everything: 0\n")  # stands for the overlay that command writes
