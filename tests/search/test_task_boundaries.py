"""Tasks stand on einstruct's public API and the search's small shared pieces, never on the engine (the loop,
training, storage, Optuna) nor on einstruct's inner modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import einstruct as es

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = os.path.join(ROOT, "search", "tasks")
SHARED = {"errors", "flops", "models", "models.gpt", "models.mlp"}  # what a task may import from search


def _modules():
    return sorted(os.path.join(TASKS, n) for n in os.listdir(TASKS) if n.endswith(".py"))


def test_tasks_import_only_einstruct_itself_and_the_searchs_shared_modules():
    bad = []
    for path in _modules():
        name = os.path.relpath(path, ROOT)
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                bad += [f"{name}: import {a.name}" for a in node.names if a.name.startswith(("einstruct.", "optuna"))]
                bad += [f"{name}: import {a.name}" for a in node.names if a.name.startswith("search")]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0 and mod.startswith(("einstruct", "optuna", "search")):
                    bad.append(f"{name}: from {mod} import ...")
                elif node.level == 2:  # from ..x import y, or from .. import y: search modules
                    mods = [mod] if mod else [a.name for a in node.names]
                    bad += [f"{name}: from ..{m} import ..." for m in mods if m not in SHARED]
    assert not bad, bad


def test_the_einstruct_names_tasks_use_are_public():
    used = set()
    for path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "es":
                used.add(node.attr)
    assert used and used <= set(es.__all__), sorted(used - set(es.__all__))
    assert {"is_btt_expert_spec", "training_memory_limit"} <= used  # what lm.py and base.py reached inside for
    assert all(getattr(es, n) is not None for n in used)


def test_importing_every_task_loads_no_engine_module():
    code = (
        "import sys, search.tasks.lm, search.tasks.cifar, search.tasks.regression; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optuna' or m in "
        "('search.loop', 'search.train', 'search.budget', 'search.ledger', 'search.recovery', 'search.storage', "
        "'search.space', 'search.families', 'search.run', 'search.settings')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
