"""Every default a document quotes for a flag of preprocess.py or dss_train.py is the parser's.

A quote is a flag mention (`--flag` or `--flag VALUE`, in a code span or a command line) followed
in the same sentence, with no other flag between, by "default": "`--val-fraction` (default 0.25)",
"`--folds K`, default 1", "`--weights imagenet` (default; ...)", "`--temperature-scaling true`, the
default", "--input defaults to ./data", "(off by default)". Only literal values are compared:
numbers (60% = 0.6), true/false, on/off, a code span, a path, or a word among the flag's choices;
"default the CPUs ...", "`$MLFLOW_EXPERIMENT_NAME`", "`<model dir>/...`" and defaults qualified by
"when"/"under"/"if" (they depend on the run) are not literal and are skipped.

docs/benchmarks.md is left out: the flags it quotes defaults for are the bench scripts'.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import dss_train
import preprocess
from dss.train import training_args
from tests.conftest import REPO_ROOT

DOCS = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
NOT_ABOUT_THE_SCRIPTS = {"benchmarks.md"}
# Which script's flags a document describes first (a line naming the other script switches to it).
SCRIPT_OF_DOC = {"preprocess.md": "preprocess"}

FLAG = re.compile(r"`(--[a-z][a-z0-9-]*)(?: ([^`]*))?`|(?<![\w`-])(--[a-z][a-z0-9-]*)")
DEFAULT = re.compile(r"\b(?:by default|defaults? to|default)\b:?")
SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
METAVARIABLE = re.compile(r"^[A-Z][A-Z_]*$")  # `--folds K`, `--weights PATH`
VALUE = re.compile(r"\s*(`[^`]*`|[\w./%,+-]+)(\s+\w+)?")
CONDITIONS = {"when", "under", "if", "unless", "locally", "else"}
MAX_GAP = 100  # characters between a flag mention and its "default"


def parser_defaults(monkeypatch) -> dict[str, dict[str, tuple]]:
    """Per script, flag -> (default, choices): what a run without that flag gets (dss_train: its
    resolved ``training_args.Settings``, as some flags default to None and are resolved there, e.g.
    --val-fraction; preprocess.py: ``parse_args([])``; flag --a-b is field a_b) and, for dss_train,
    its parser's choices (preprocess.py builds its parser inside ``parse_args``)."""
    for name in [name for name in os.environ if name.startswith(("SM_", "MLFLOW_"))]:
        monkeypatch.delenv(name)  # SageMaker and MLflow settings change some defaults
    train_args = dss_train.parse_args(["--data-dir", "data", "--model-dir", "models"])
    settings = training_args.Settings.from_args(train_args)
    train = {name: getattr(settings, name, default) for name, default in vars(train_args).items()}
    train.update(data_dir=None, model_dir=None, output_dir=None)  # the paths given above
    choices = {option: action.choices for action in dss_train.build_parser()._actions
               for option in action.option_strings}
    values = {"dss_train": train, "preprocess": vars(preprocess.parse_args([]))}
    return {script: {"--" + name.replace("_", "-"): (default, choices.get("--" + name.replace("_", "-"))
                                                     if script == "dss_train" else None)
                     for name, default in fields.items()}
            for script, fields in values.items()}


def _paragraphs(text: str):
    """(first line number, text) of each paragraph, wrapped lines joined; table rows, headings and
    command lines stay one per line."""
    lines, start, block = text.splitlines(), 0, []
    for number, line in enumerate(lines + [""], start=1):
        single = line.lstrip().startswith(("|", "#", "python", "make", "-")) or not line.strip()
        if single and block:
            yield start, " ".join(block)
            block = []
        if single and line.strip():
            yield number, line
        elif not single:
            start = start if block else number
            block.append(line.strip())


def _literal(after: str, choices) -> str | None:
    """The value right after "default", or None when it is not a literal one."""
    match = VALUE.match(after)
    if match is None or (match.group(2) or "").strip() in CONDITIONS:
        return None
    value = match.group(1).rstrip(",;")
    if value.startswith("`"):
        value = value.strip("`")
        return None if any(mark in value for mark in "<$ ") else value
    if re.fullmatch(r"[\d,]*\.?\d+%?|true|false|on|off|none|\.{0,2}/[\w./-]*", value, flags=re.IGNORECASE):
        return value
    if choices and value.casefold() in {str(choice).casefold() for choice in choices}:
        return value
    return None


def quoted_defaults(text: str, choices_of) -> list[tuple[int, str, str, str]]:
    """(line, flag, quoted value, the quote) of each literal default quoted in a document;
    ``choices_of(flag)``: the flag's choices (None: any)."""
    found = []
    for line, paragraph in _paragraphs(text):
        mentions = list(FLAG.finditer(paragraph))
        for index, mention in enumerate(mentions):
            flag, span_value = mention.group(1) or mention.group(3), mention.group(2)
            end = mentions[index + 1].start() if index + 1 < len(mentions) else len(paragraph)
            stop = SENTENCE_END.search(paragraph, mention.end())
            window = paragraph[mention.end():min(end, stop.start() if stop else end, mention.end() + MAX_GAP)]
            said = DEFAULT.search(window)
            if said is None:
                continue
            switch = re.search(r"\b(off|on) by default", window)
            if switch:
                value = switch.group(1)
            elif span_value and not METAVARIABLE.match(span_value) and re.fullmatch(r"[\s,;(]*(the\s+)?",
                                                                                     window[:said.start()]):
                value = span_value  # `--flag V` (default) / `--flag V`, the default
            else:
                value = _literal(window[said.end():], choices_of(flag))
            if value is not None:
                found.append((line, flag, value, paragraph[mention.start():mention.end() + said.end() + 24]))
    return found


def _same(quoted: str, default) -> bool:
    text = quoted.strip().casefold()
    if isinstance(default, bool) or text in ("true", "false", "on", "off"):
        return isinstance(default, bool) and default == (text in ("true", "on"))
    if default is None:
        return text == "none"
    if isinstance(default, (int, float)):
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text.replace(",", ""))
        except ValueError:
            return False
        return number == pytest.approx(float(default))
    return text == str(default).casefold()


def _scripts_for(doc: Path, line_text: str) -> list[str]:
    """The scripts whose flags a line may describe, most likely first: the one it names, else the doc's."""
    first = SCRIPT_OF_DOC.get(doc.name, "dss_train")
    for script, other in (("preprocess", "dss_train"), ("dss_train", "preprocess")):
        if f"{script}.py" in line_text and f"{other}.py" not in line_text:
            first = script
    return [first, "preprocess" if first == "dss_train" else "dss_train"]


def mismatches(doc: Path, defaults: dict) -> tuple[list[str], int]:
    """The quotes in ``doc`` that disagree with the parsers, and how many quotes were checked."""
    text = doc.read_text(encoding="utf-8")
    lines, problems = text.splitlines(), []

    def choices_of(flag: str):
        return next((defaults[script][flag][1] for script in defaults if flag in defaults[script]), None)

    quotes = quoted_defaults(text, choices_of)
    for line, flag, value, quote in quotes:
        scripts = [script for script in _scripts_for(doc, lines[line - 1]) if flag in defaults[script]]
        if not scripts:
            problems.append(f"{doc.name}:{line}: {flag} is no flag of dss_train.py or preprocess.py: {quote!r}")
        elif not _same(value, defaults[scripts[0]][flag][0]):
            problems.append(f"{doc.name}:{line}: {flag} default quoted as {value!r}, {scripts[0]}.py's default is "
                            f"{defaults[scripts[0]][flag][0]!r}: {quote!r}")
    return problems, len(quotes)


def test_the_defaults_quoted_in_the_docs_are_the_parsers(monkeypatch):
    defaults = parser_defaults(monkeypatch)
    problems, checked = [], 0
    for doc in DOCS:
        if doc.name not in NOT_ABOUT_THE_SCRIPTS:
            found, count = mismatches(doc, defaults)
            problems += found
            checked += count
    assert checked >= 15  # the pattern still finds the docs' quotes
    assert not problems, "\n".join(problems)


def test_the_quote_pattern_reads_the_docs_phrasings():
    text = """A crop (`--crop-scale`..100% of the area, default 60%, none at 1), `--folds K`, default 1 = one split.
`--weights imagenet` (default; downloaded), `--temperature-scaling true`, the default. (`--workers`, default the
CPUs this process may use); `--tta`, default true when training; `--output-dir`, by default `<model dir>/x`.
`--keep-checkpoints N` keeps the newest N, default 1. `--arch` (default ResNet18).

| `--mlflow-log-model true` | also upload it (off by default) |
python preprocess.py --output-dir ./output   # --input defaults to ./data
"""
    choices = {"--arch": ("resnet18", "resnet34")}
    found = [(flag, value) for _, flag, value, _ in quoted_defaults(text, choices.get)]
    assert found == [("--crop-scale", "60%"), ("--folds", "1"), ("--weights", "imagenet"),
                     ("--temperature-scaling", "true"), ("--keep-checkpoints", "1"), ("--arch", "ResNet18"),
                     ("--mlflow-log-model", "off"), ("--input", "./data")]
    assert _same("60%", 0.6) and not _same("60%", 1.0) and _same("off", False) and _same("ResNet18", "resnet18")
