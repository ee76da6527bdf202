"""The docs as a new user meets them: their configs validate, their commands exist.

Rules, so that a doc block is checked or skipped visibly, never by a caught error:

* Every fenced block tagged ```yaml in README.md and docs/*.md is a (partial) fedslim config. It is
  loaded with ``yaml.safe_load`` and validated by ``fedslim.config.validate`` (what ``load_config``
  runs after reading a file), so a renamed field, option or codec makes this test fail.
* A yaml block that is deliberately not a config (a fragment, an output) either takes another tag
  (```text, ```json, or none) or starts with the line ``# docs-test: skip (<why>)``; such blocks are
  reported as skipped tests with that reason.
* Every ``fedslim <subcommand> ...`` in the code (fenced blocks and `inline` spans) of README.md and
  docs/*.md names a subcommand of ``fedslim.cli.build_parser()``, and nested ones (``fedslim data
  verify``) exist too.
  The command lines of README.md's fenced bash blocks, and its inline spans that are a whole
  ``fedslim ...`` command, parse with that parser as written.
* Every ``examples/*.yaml`` a doc names in its code exists and loads with ``load_config``.
* Inline spans made only of ``--set KEY=VALUE`` pairs load on top of the default config (those that
  set ``algorithm.params`` of an algorithm they do not name are reported as skipped).
* The ``| parameter | default | meaning |`` tables of docs/heterofl.md and docs/autoflip.md list every
  field of their algorithm's Params, in order, each with the code's default.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from fedslim.cli import build_parser
from fedslim.config import load_config, validate

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "# docs-test: skip"

# A fence line: ``` plus an optional info string; the block runs to the next bare ``` line.
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
# Inline code may wrap onto the next line (Markdown joins it with a space); it never crosses a blank line.
_INLINE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language tag, 1-based line of the opening fence, body) of every fenced block in ``path``."""
    text = path.read_text()
    return [(m.group(1).strip().split(" ")[0], text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in _FENCE.finditer(text)]


def inline_spans(path: Path) -> list[str]:
    """`inline code` spans outside fenced blocks."""
    return [" ".join(span.split()) for span in _INLINE.findall(_FENCE.sub("", path.read_text()))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


YAML_BLOCKS = [(f"{_rel(p)}:{line}", body) for p in DOCS for tag, line, body in fenced_blocks(p) if tag == "yaml"]


def test_docs_have_yaml_blocks() -> None:
    # Guards the extraction itself: a changed fence syntax must not turn every check below into none.
    assert len(YAML_BLOCKS) >= 4, [where for where, _ in YAML_BLOCKS]


@pytest.mark.parametrize("where,body", YAML_BLOCKS, ids=[w for w, _ in YAML_BLOCKS])
def test_yaml_block_is_a_valid_config(where: str, body: str) -> None:
    first = body.lstrip().splitlines()[0] if body.strip() else ""
    if first.startswith(SKIP_MARK):
        pytest.skip(f"{where}: {first}")
    raw = yaml.safe_load(body)
    assert isinstance(raw, dict), f"{where}: a yaml block must be a mapping of config sections"
    validate(raw)  # raises ConfigError naming the field


# ---------------------------------------------------------------------------------------------
# fedslim subcommands


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


_COMMAND = re.compile(r"(?:^|[\s/])fedslim((?: [a-z][\w-]*)+)")


def fedslim_commands(code: str) -> list[list[str]]:
    """The words after each ``fedslim`` (or ``.venv/bin/fedslim``) in ``code``, up to the first
    word that is not a plain lower-case name (an option, a path, a placeholder)."""
    return [m.group(1).split() for m in _COMMAND.finditer(code)]


def _code(path: Path) -> list[str]:
    return [body for _, _, body in fenced_blocks(path)] + inline_spans(path)


# (file, words after fedslim): README.md first, then the pages in docs/, which name commands too.
DOC_COMMANDS = sorted({(_rel(p), tuple(words)) for p in DOCS for code in _code(p) for words in fedslim_commands(code)})


def test_readme_names_fedslim_commands() -> None:
    readme = {words[0] for where, words in DOC_COMMANDS if where == "README.md"}
    assert readme >= {"run", "list", "config", "report", "data"}, DOC_COMMANDS


@pytest.mark.parametrize("where,words", DOC_COMMANDS, ids=[f"{w}:{' '.join(c)}" for w, c in DOC_COMMANDS])
def test_named_subcommand_exists(where: str, words: tuple[str, ...]) -> None:
    parser = build_parser()
    path = ["fedslim"]
    subs = _subparsers(parser)
    for word in words:
        if not subs:
            break  # a leaf command: the remaining words are its arguments
        assert word in subs, (f"{where} names `{' '.join(path)} {word}`, but {' '.join(path)} has only "
                              f"{sorted(subs)}")
        path.append(word)
        subs = _subparsers(subs[word])


_LINE = re.compile(r"^(\S*/)?fedslim ")


def _readme_bash_lines() -> list[str]:
    """``fedslim ...`` lines of README.md's fenced bash blocks, comments cut."""
    lines = []
    for tag, _, body in fenced_blocks(ROOT / "README.md"):
        if tag not in ("bash", "sh", "console"):
            continue
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if _LINE.match(line):
                lines.append(line)
    return lines


README_BASH_LINES = _readme_bash_lines()
# ... and inline spans that are a whole ``fedslim ...`` command.
README_LINES = README_BASH_LINES + [s for s in inline_spans(ROOT / "README.md") if _LINE.match(s)]


def test_readme_has_fedslim_command_lines() -> None:
    assert len(README_BASH_LINES) >= 3, README_BASH_LINES
    assert len(README_LINES) > len(README_BASH_LINES), README_LINES


@pytest.mark.parametrize("line", README_LINES)
def test_readme_command_parses(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Placeholders (FILE, <config>, DIR) parse as the values they stand for.
    argv = shlex.split(line)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README command does not parse as written: {line}\n{capsys.readouterr().err}")


# ---------------------------------------------------------------------------------------------
# examples named in the docs


def _expand_braces(name: str) -> list[str]:
    parts = re.split(r"\{([^{}]*)\}", name)
    fixed, choices = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(itertools.chain.from_iterable(zip(fixed, combo + ("",), strict=True)))
            for combo in itertools.product(*choices)]


def _doc_examples() -> list[str]:
    names: set[str] = set()
    for p in DOCS:
        code = [body for _, _, body in fenced_blocks(p)] + inline_spans(p)
        for chunk in code:
            for m in re.finditer(r"examples/[\w{},.-]+?\.yaml", chunk):
                names.update(_expand_braces(m.group(0)))
    return sorted(names)


DOC_EXAMPLES = _doc_examples()


def test_docs_name_examples() -> None:
    assert len(DOC_EXAMPLES) >= 10, DOC_EXAMPLES


@pytest.mark.parametrize("name", DOC_EXAMPLES)
def test_doc_example_exists_and_loads(name: str) -> None:
    path = ROOT / name
    assert path.is_file(), f"a doc names {name}, which does not exist"
    load_config(path)


# ---------------------------------------------------------------------------------------------
# --set overrides shown on their own


def _override_spans() -> list[str]:
    """Inline spans of README.md and docs/*.md made only of ``--set KEY=VALUE`` pairs."""
    spans = {s for p in DOCS for s in inline_spans(p) if re.fullmatch(r"(--set \S+=\S+ ?)+", s)}
    return sorted(spans)


OVERRIDE_SPANS = _override_spans()


def test_docs_show_overrides() -> None:
    assert len(OVERRIDE_SPANS) >= 2, OVERRIDE_SPANS


@pytest.mark.parametrize("span", OVERRIDE_SPANS)
def test_override_span_applies_to_the_default_config(span: str) -> None:
    # Partial algorithm.params overrides are checked against the algorithm the doc means; without
    # one, against the default (FedAvg), so this takes only overrides outside algorithm.params.
    overrides = shlex.split(span)[1::2]
    if any(o.startswith("algorithm.params.") for o in overrides):
        pytest.skip(f"{span}: algorithm.params of an algorithm the span does not name")
    load_config(None, overrides)


# ---------------------------------------------------------------------------------------------
# parameter tables


def _parameter_table(path: Path) -> list[tuple[str, str]]:
    """(name, default cell) of the rows of the ``| parameter | default | meaning |`` table in ``path``."""
    rows, inside = [], False
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["parameter", "default"]:
            inside = True
        elif inside and not cells:
            break
        elif inside and not set(cells[0]) <= set("-: "):
            rows.append((cells[0].strip("`"), cells[1]))
    return rows


def _doc_value(cell: str) -> object:
    """A default as the table writes it: `true`, 500, none, `{a: 1, b: 1/2}`."""
    text = cell.strip("`")
    if text == "none":
        return None
    return yaml.safe_load(re.sub(r"\b(\d+)/(\d+)\b", lambda m: str(int(m[1]) / int(m[2])), text))


def _params_model(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Each algorithm page's parameter table, against the pydantic model that validates the parameters.
PARAMETER_TABLES = {"docs/heterofl.md": "fedslim.algorithms.heterofl.HeteroFLParams",
                    "docs/autoflip.md": "fedslim.algorithms.autoflip.AutoFLIPParams",
                    "docs/dac.md": "fedslim.algorithms.dac.DACParams"}
TABLE_ROWS = [(doc, name, cell) for doc in PARAMETER_TABLES for name, cell in _parameter_table(ROOT / doc)]


@pytest.mark.parametrize("doc", list(PARAMETER_TABLES))
def test_parameter_table_lists_every_parameter(doc: str) -> None:
    assert [name for name, _ in _parameter_table(ROOT / doc)] == list(_params_model(PARAMETER_TABLES[doc]).model_fields)


@pytest.mark.parametrize("doc,name,cell", TABLE_ROWS, ids=[f"{d}:{n}" for d, n, _ in TABLE_ROWS])
def test_parameter_table_default_is_the_code_default(doc: str, name: str, cell: str) -> None:
    field = _params_model(PARAMETER_TABLES[doc]).model_fields[name]
    assert _doc_value(cell) == field.get_default(call_default_factory=True), f"{doc}: {name}"
