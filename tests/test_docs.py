"""The code in the documentation runs: every ```python block of docs/*.md and README.md.

Conventions for documentation authors:

* A block fenced as ```python (or ```py) is executed. The blocks of one file run in order in
  one shared namespace, like cells of a notebook, so later blocks may use names defined earlier.
  Each file starts from a fresh namespace.
* A block whose info string carries ``no-run`` (```python no-run) is shown but not executed;
  use it for code that needs CUDA, a trained network, or a long time.
* Fences may be indented (e.g. inside a list); the indentation is stripped.
* Tracebacks point at the Markdown file and line, so a failure reads ``docs/x.md:42``.
* Keep the code small and fast: the whole test should run in a few seconds on a CPU.

Each file runs in a temporary working directory, and the global state that documentation
code may touch (the solver registry, torch's default dtype and RNG) is restored afterwards.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from sdediff.solvers import base as solver_base

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [p for p in [ROOT / "README.md"] if p.exists()]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
RUNNABLE_LANGS = {"python", "py"}


def code_blocks(path: pathlib.Path):
    """``(first_line, info_words, code)`` for each fenced block of ``path`` (1-based line numbers)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip().split()
        start, body = i + 2, []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        else:
            raise AssertionError(f"{path.name}:{start - 1}: unclosed code fence")
        blocks.append((start, info, "\n".join(body) + "\n"))
        i += 1
    return blocks


def runnable(info) -> bool:
    return bool(info) and info[0].lower() in RUNNABLE_LANGS and "no-run" not in info[1:]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in a scratch directory and restore the global state that doc code may change."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    registry = dict(solver_base._REGISTRY)
    dtype = torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    solver_base._REGISTRY.clear()
    solver_base._REGISTRY.update(registry)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)


def test_docs_are_collected():
    names = {p.name for p in DOC_FILES}
    assert {"getting_started.md", "sde_samplers.md", "solvers.md"} <= names
    for path in DOC_FILES:
        if path.parent.name == "docs":
            assert any(runnable(info) for _, info, _ in code_blocks(path)), f"{path.name} has no runnable python block"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_runs(path, isolated):
    namespace = {"__name__": "__docs__"}
    rel = str(path.relative_to(ROOT))
    for first_line, info, code in code_blocks(path):
        if not runnable(info):
            continue
        # Pad so that line numbers in tracebacks are those of the Markdown file.
        source = "\n" * (first_line - 1) + code
        exec(compile(source, rel, "exec"), namespace)
