"""User spaces: a TOML space file (``--space myspace.toml``) or a Python entry point (``--space pkg.mod:SPACE``).

A space file (README "Search spaces" shows a worked example):

    include = ["dense", "btt"]          # built-in families, by name
    references = ["dense", { family = "tt3", rank = 2 }]   # optional; default: the included built-ins' own

    [families.tt3]                      # a family in the spec language with free parameters in braces
    spec = "abc,adr,besr,cfs->def"
    sizes = { a = "d_in^1/3", ..., r = "{rank}", s = "{rank}" }
    params = { rank = [1, 2, 4] }
    label = "TT-3"                      # optional: the family's name in the report (default: its name)
    group = "TT-3"                      # optional: its report group (default: its label)

An entry point names a module attribute holding the same table as a dict, or a list of built-in family names
and Family objects (search.families.Family subclasses). Every error is one line naming the family and the key.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from ..errors import SearchError
from .base import Family
from .registry import BUILTIN, lookup
from .spec_family import FamilyError, SpecFamily

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP = ("include", "references", "families")
_FAMILY_KEYS = ("spec", "sizes", "params", "label", "group")


def is_user_space(name: str) -> bool:
    return name.endswith(".toml") or ":" in name or os.sep in name


def load(source: str) -> tuple[tuple[Family, ...], tuple[tuple[Family, dict], ...]]:
    """(families, references as (family, arguments)) of a space file or an entry point."""
    if ":" in source and not source.endswith(".toml") and not os.path.exists(source):
        return _from_object(_entry_point(source), f"space {source}")
    return _from_table(_read_toml(source), f"space file {source}")


def _read_toml(path: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SearchError(f"no space file {path}; give a .toml file, a built-in space or pkg.module:SPACE") from None
    except OSError as e:
        raise SearchError(f"cannot read the space file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SearchError(f"space file {path} is not valid TOML: {e}") from None


def _entry_point(source: str):
    mod, _, attr = source.partition(":")
    if not mod or not attr:
        raise SearchError(f"space {source!r}: write an entry point as package.module:NAME")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise SearchError(f"space {source}: cannot import {mod} ({e}); put it on PYTHONPATH or install it") from None
    if not hasattr(module, attr):
        raise SearchError(f"space {source}: module {mod} has no {attr}")
    return getattr(module, attr)


def _from_object(obj, where: str):
    if isinstance(obj, dict):
        return _from_table(obj, where)
    if isinstance(obj, Family):
        obj = [obj]
    if not isinstance(obj, (list, tuple)) or not obj:
        raise SearchError(f"{where}: give a dict (the space file's table) or a list of families, not {obj!r}")
    fams = []
    for item in obj:
        if isinstance(item, str):
            fams.append(_builtin(item, where, "include"))
        elif isinstance(item, Family):
            if not item.name or not _NAME.match(item.name):
                raise SearchError(f"{where}: family {item.name!r}: key name: a name such as tt3 (letters, digits, _)")
            fams.append(item)
        else:
            raise SearchError(f"{where}: {item!r} is neither a built-in family's name nor a search.families.Family")
    _unique(fams, where)
    return tuple(fams), tuple((f, r) for f in fams for r in f.references())


def _builtin(name, where: str, key: str) -> Family:
    if not isinstance(name, str) or name not in BUILTIN:
        raise SearchError(f"{where}: key {key}: {name!r} is not a built-in family; choose from {', '.join(BUILTIN)}")
    return lookup(name)


def _unique(fams, where):
    seen = set()
    for f in fams:
        if f.name in seen:
            raise SearchError(f"{where}: family {f.name} is given twice; keep one")
        seen.add(f.name)


def _from_table(table: dict, where: str):
    unknown = [k for k in table if k not in _TOP]
    if unknown:
        raise SearchError(f"{where}: unknown key {unknown[0]!r}; a space has {', '.join(_TOP)}")
    include = table.get("include", [])
    if not isinstance(include, list):
        raise SearchError(f'{where}: key include: give a list of built-in family names, e.g. ["dense", "btt"]')
    fams: list[Family] = [_builtin(n, where, "include") for n in include]
    own = table.get("families", {})
    if not isinstance(own, dict):
        raise SearchError(f"{where}: key families: give tables [families.NAME]")
    for name, body in own.items():
        fams.append(_family(name, body, where))
    if not fams:
        raise SearchError(f'{where}: no families; add [families.NAME] tables or include = ["dense", ...]')
    _unique(fams, where)
    by = {f.name: f for f in fams}
    refs = table.get("references")
    if refs is None:
        return tuple(fams), tuple((f, r) for f in fams if f.name in BUILTIN for r in f.references())
    if not isinstance(refs, list):
        raise SearchError(f'{where}: key references: give a list such as ["dense", {{ family = "tt3", rank = 2 }}]')
    out = []
    for item in refs:
        name = item if isinstance(item, str) else item.get("family") if isinstance(item, dict) else None
        if name not in by:
            raise SearchError(f"{where}: key references: {item!r} names no family of this space ({', '.join(by)})")
        fam = by[name]
        if isinstance(item, str):
            points = fam.references() or (({},) if not fam.keys else ())
            if not points:
                raise SearchError(
                    f"{where}: family {name}, key references: {name} has parameters; give them, e.g. "
                    f"{{ family = {name!r}, {fam.keys[0]} = ... }}"
                )
            out += [(fam, p) for p in points]
            continue
        args = {k: v for k, v in item.items() if k != "family"}
        try:
            out.append((fam, fam.normalize(args)))
        except FamilyError as e:
            raise SearchError(f"{where}: family {name}, key references.{e.key}: {e}") from None
        except SearchError as e:
            raise SearchError(f"{where}: key references: {e}") from None
    return tuple(fams), tuple(out)


def _family(name, body, where: str) -> Family:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SearchError(f"{where}: family {name!r}: a family's name is letters, digits and _ (e.g. tt3)")
    if name in BUILTIN:
        raise SearchError(
            f'{where}: family {name} is a built-in family; include it (include = ["{name}"]) or name yours otherwise'
        )
    if not isinstance(body, dict):
        raise SearchError(f"{where}: family {name}: give a table [families.{name}] with spec, sizes and params")
    unknown = [k for k in body if k not in _FAMILY_KEYS]
    if unknown:
        raise SearchError(
            f"{where}: family {name}, key {unknown[0]}: unknown key; a family has {', '.join(_FAMILY_KEYS)}"
        )
    for key, kind in (("spec", str), ("sizes", dict)):
        if not isinstance(body.get(key), kind):
            raise SearchError(
                f"{where}: family {name}, key {key}: "
                + (
                    'missing or not a string, e.g. spec = "ga,gaf,fge->fe"'
                    if key == "spec"
                    else "missing or not a table"
                )
            )
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise SearchError(f"{where}: family {name}, key params: give a table, e.g. params = {{ rank = [1, 2] }}")
    for key in ("label", "group"):
        if not isinstance(body.get(key, ""), str):
            raise SearchError(f"{where}: family {name}, key {key}: give a string")
    try:
        return SpecFamily(name, body["spec"], body["sizes"], params, body.get("label", ""), body.get("group", ""))
    except FamilyError as e:
        raise SearchError(f"{where}: family {name}, key {e.key}: {e}") from None
