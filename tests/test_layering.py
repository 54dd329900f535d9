"""DESIGN.md's import table, enforced: imports point down, stages never import each other, and the cheap
modules (lmforge, lmforge.plan, lmforge.model.config) never load torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# package -> lmforge packages it may import ("errors" and "config" are leaves anyone may use)
ALLOWED = {
    "model": set(),
    "tokenizer": set(),
    "data": {"tokenizer"},
    "checkpoint": {"model", "tokenizer"},
    "gguf": {"model", "tokenizer"},  # beside checkpoint: llama.cpp's format as checkpoint.py is HF's
    "training": {"model", "data", "checkpoint", "tokenizer"},
    "pretrain": {"training", "model", "tokenizer", "data", "checkpoint"},
    "finetune": {"training", "model", "tokenizer", "data", "checkpoint"},
    "inference": {"model", "tokenizer", "checkpoint", "gguf"},
    "serve": {"inference", "tokenizer", "rag", "jobs"},  # grounds answers in an index (--rag); runs fine-tuning jobs
    "jobs": {"finetune", "data", "checkpoint", "tokenizer"},
    "rag": {"inference", "tokenizer"},
    "eval": {"inference", "data", "model", "checkpoint", "rag", "plan", "tokenizer"},
    "plan": {"model"},
}
LEAVES = {"errors", "config", "__init__"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmforge" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    pkg = _package_of(path)
    if pkg in ("cli", "__init__", "errors", "config"):
        if pkg != "cli":
            assert _imports(path) <= LEAVES, f"{path} must import only errors/config"
        return
    bad = _imports(path) - ALLOWED[pkg] - LEAVES - {pkg}
    assert not bad, f"{path.relative_to(SRC)} ({pkg}) imports {sorted(bad)}; DESIGN.md allows {sorted(ALLOWED[pkg])}"


def test_plan_model_accounting_are_stdlib_only():
    for rel in ("model/config.py", "model/accounting.py"):
        assert _imports(SRC / rel) <= {"model", "errors"}


def test_nothing_imports_cli():
    for path in SRC.rglob("*.py"):
        if path.name != "cli.py":
            assert "cli" not in _imports(path), path


@pytest.mark.parametrize("module", ["lmforge", "lmforge.plan", "lmforge.model.config", "lmforge.model.accounting",
                                    "lmforge.cli", "lmforge.config"])
def test_cheap_modules_do_not_load_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
