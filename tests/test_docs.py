"""The docs point at things that exist, inside the repository, by their current names.

Every repository path the docs and the README name exists; every `docs/*.md` a module or a doc
names exists; no doc cites a path outside the repository; modules are named by their installed
names (`gpufleet.pipeline...`), not the old top-level ones (`pipeline.usage...`).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "BENCHMARKS.md"]
SOURCES = [p for d in ("gpufleet", "agents", "pipeline", "dashboards", "embedded", "bench", "tests")
           for p in sorted((ROOT / d).rglob("*.py"))]
TOP = ("agents", "pipeline", "dashboards", "embedded", "gpufleet", "bench", "tests", "deploy", "docs")
PATH = re.compile(r"(?<![\w./-])((?:{})/[\w./-]+)".format("|".join(TOP)))
DOC = re.compile(r"(?<![\w/-])docs/[\w.-]+\.md")
OLD_NAME = re.compile(r"(?<![\w./-])(?:agents|pipeline|dashboards|embedded)\.[a-z_]+(?:\.[a-z_]+)*(?!\w)")
FILE_SUFFIXES = (".md", ".py", ".yaml", ".yml", ".json", ".sql", ".toml", ".sh")


def _lines(paths: list[Path]) -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}:{n}", line) for p in paths for n, line in enumerate(p.read_text().splitlines(), 1)]


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = [(where, m.rstrip(".,:;)")) for where, line in _lines(DOCS) for m in PATH.findall(line)
               if not (ROOT / m.rstrip(".,:;)")).exists()]
    assert missing == []


def test_every_doc_a_module_or_a_doc_names_exists() -> None:
    missing = [(where, m) for where, line in _lines(SOURCES + DOCS) for m in DOC.findall(line)
               if not (ROOT / m).exists()]
    assert missing == []


def test_no_doc_cites_a_path_outside_the_repository() -> None:
    assert [where for where, line in _lines(DOCS) if "/work/" in line] == []


def test_modules_are_named_by_their_installed_names() -> None:
    old = [(where, m) for where, line in _lines(DOCS) for m in OLD_NAME.findall(line)
           if not m.endswith(FILE_SUFFIXES)]
    assert old == []


def test_every_module_says_its_job_in_a_short_head() -> None:
    """A module's docstring says what it is for in a few lines; design notes live in docs/design-notes.md."""
    import ast

    long_or_missing = []
    for folder in ("gpufleet", "agents", "pipeline", "dashboards", "embedded"):
        for path in (ROOT / folder).rglob("*.py"):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if not doc or len(doc.splitlines()) > 12:
                long_or_missing.append(str(path.relative_to(ROOT)))
    assert long_or_missing == []
