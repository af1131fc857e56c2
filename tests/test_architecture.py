"""docs/architecture.md stays true: every module, package and file it names exists, and every module of the
two packages is named in it (a new module gets its line on the map)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(ROOT, "docs", "architecture.md")
PATH = re.compile(r"`((?:einstruct|search|tests|benchmarks|docs|examples)/[\w/.-]*)`")


def _named() -> list[str]:
    return PATH.findall(open(MAP).read())


def test_every_path_the_map_names_exists():
    named = _named()
    assert len(named) > 40
    missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p))]
    assert missing == []


def test_every_module_is_on_the_map():
    named = set(_named())
    covered = {p for p in named if p.endswith(".py")}
    packages = tuple(p for p in named if p.endswith("/") and p.count("/") >= 2)  # a subpackage, not search/
    absent = []
    for top in ("einstruct", "search"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                rel = os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                if f.endswith(".py") and f not in ("__init__.py", "__main__.py"):
                    if rel not in covered and not rel.startswith(packages):
                        absent.append(rel)
    assert absent == []
