"""The documentation a newcomer reads stays true to the code.

docs/cli.md is the command-line contract: every subcommand and option string of the real
argparse parsers must appear in it. The README's Python example must use public names
only, so that it does not teach an internal module path that a reorganisation moves.
Citations of docs/cli.md sections and benchmarks/results/ files in the code must point
at something that exists.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import classify
import retrieval
from classify.cli import build_parser as classify_parser
from retrieval.cli.app import build_parser as retrieval_parser

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError(f"{parser.prog} has no subcommands")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def _mentions(text: str, word: str) -> bool:
    """`word` as a whole token: `--qe` is not found inside `--qe-alpha`."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def missing_from_doc(doc: str, program: str, parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for name, sub in _subcommands(parser).items():
        if not _mentions(doc, f"{program} {name}"):
            missing.append(f"{program} {name}")
        missing += [f"{program} {name} {opt}" for opt in sorted(_options(sub)) if not _mentions(doc, opt)]
    return missing


@pytest.mark.parametrize("program, parser", [("retrieval", retrieval_parser), ("classify", classify_parser)])
def test_every_subcommand_and_flag_is_in_the_cli_doc(program, parser):
    missing = missing_from_doc(CLI_DOC.read_text(), program, parser())
    assert not missing, f"docs/cli.md does not document: {', '.join(missing)}"


def test_the_doc_check_notices_a_missing_flag():
    doc = CLI_DOC.read_text()
    assert _mentions(doc, "--query-rotations")
    cut = re.sub(r"(?<![\w-])--query-rotations(?![\w-])", "--gone", doc)
    assert "retrieval query --query-rotations" in missing_from_doc(cut, "retrieval", retrieval_parser())
    cut = doc.replace("classify factors", "classify elsewhere")
    assert "classify factors" in missing_from_doc(cut, "classify", classify_parser())


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_example_uses_public_names_only():
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if "from retrieval import" in b]
    assert blocks, "README.md has no Python example importing from retrieval"
    public = {"retrieval": set(retrieval.__all__), "classify": set(classify.__all__)}
    imported: dict[str, set[str]] = {"retrieval": set(), "classify": set()}
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top not in public or alias.name == top, f"README imports internal module {alias.name}"
            elif isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                if top in public:
                    assert node.module == top, f"README imports from internal module {node.module}"
                    imported[top] |= {a.name for a in node.names}
    for package, names in imported.items():
        assert names, f"the README example shows nothing of {package}"
        assert names <= public[package], f"not in {package}.__all__: {sorted(names - public[package])}"
    assert {"Index", "ExtractorConfig", "SearchConfig"} <= imported["retrieval"]


def _cited(pattern: str) -> set[tuple[str, str]]:
    found = set()
    for folder in ("retrieval", "classify", "benchmarks", "tests", "docs", "examples"):
        for path in (ROOT / folder).rglob("*"):
            # benchmarks/.cache holds the peers' virtual environments, not the project's text.
            if path.suffix in (".py", ".md") and path.is_file() and ".cache" not in path.relative_to(ROOT).parts:
                found |= {(str(path.relative_to(ROOT)), m) for m in re.findall(pattern, path.read_text())}
    for path in ROOT.glob("*.md"):
        found |= {(path.name, m) for m in re.findall(pattern, path.read_text())}
    return found


def test_cited_cli_doc_sections_exist():
    sections = set(re.findall(r"^## (\d+)\. ", CLI_DOC.read_text(), flags=re.M))
    wrong = sorted((where, n) for where, n in _cited(r"docs/cli\.md,? sections? (\d+)") if n not in sections)
    assert not wrong, f"citations of docs/cli.md sections that do not exist: {wrong}"


def test_cited_benchmark_result_files_exist():
    wrong = sorted((where, name) for where, name in _cited(r"benchmarks/results/([\w-]+\.md)")
                   if not (ROOT / "benchmarks" / "results" / name).is_file())
    assert not wrong, f"citations of benchmark result files that do not exist: {wrong}"
    assert not (ROOT / "benchmarks" / "RESULTS.md").exists(), "the notebook lives in benchmarks/results/"


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md",
             *(ROOT / "benchmarks" / "results").glob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to nothing: {broken}"
