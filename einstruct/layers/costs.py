"""What the layout planner charges for copies and matmul forms, one table per device type (torch-free).

The planner (:mod:`einstruct.layers.layout`) prices a layout of the chain in units per element: a permute
copy that moves contiguous runs, or stays within cache-sized blocks, costs ``copy`` per element moved, one
that scatters costs ``scattered``; a matmul in any form but the plain ``(rows, K) @ (K, P)`` costs ``form``
per element of its activation more, plus ``mac * slowdown`` per multiply-add, where the slowdown of each
other form (``act_t``: activation laid out (K, M); ``out_t``: output (P, M) = core @ act; ``both_t``: both)
is a pair: when M is the input rows alone, and when M carries axes besides them. Only ratios matter: a
plan is the argmin of the sum, so a table scaled by a constant plans the same.

A :class:`CostTable` is a frozen value. Built in:

- ``cpu``: measured on CPU (one and two threads, float32; the permute copies at 1024 rows, the forms over
  a grid of (M, K, P) and on whole layers). Every CPU plan follows from these numbers.
- ``cuda``: unmeasured. Plain and transposed forms are priced alike (``form`` 0, no slowdown: cuBLAS reads
  a transposed operand through its op flags, not a copy), copies as on CPU (memory-bound on both).

A layer is planned with the table of the device type its parameters live on, when it is built and again
whenever it moves (``.to()``, ``.cuda()``, ``to_empty()``, ``load_state_dict(assign=True)``; parameters
swapped in any other way keep the plan they had, exact but priced for the old device); a device type with
no table (``meta``, ``mps``, ...) is planned with ``cpu``'s. Tables measured on the user's hardware
(``python -m benchmarks.layers --calibrate --out costs.json``) replace the entry of their device:
``EINSTRUCT_COST_TABLE=costs.json`` (several files separated by ``os.pathsep``) or
``es.use_cost_table("costs.json")``, the call taking precedence; layers built before are re-planned only
when they move.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

from ..errors import CostTableError

ENV = "EINSTRUCT_COST_TABLE"
FORMAT = "einstruct layout costs 1"
FORMS = {(True, False): "act_t", (False, True): "out_t", (True, True): "both_t"}  # (act_kr, core_left)
CALIBRATE = "python -m benchmarks.layers --calibrate --out PATH"


@dataclass(frozen=True)
class CostTable:
    """The planner's prices on one device type, in units per element (a fast copy is 2)."""

    device: str  # the torch device type it is for: "cpu", "cuda", ...
    copy: float  # per element of a permute copy of contiguous runs (>= 16 elements) or cache-sized blocks
    scattered: float  # per element of a permute copy that scatters
    form: float  # per activation element of a matmul in any form but the plain one
    mac: float  # per multiply-add (forward and both gradients) of the plain form
    act_t: tuple[float, float]  # slowdown per multiply-add, (M = input rows, M carries axes): act (K, M)
    out_t: tuple[float, float]  # ... output (P, M) = core (P, K) @ act
    both_t: tuple[float, float]  # ... both: (P, M) = core (P, K) @ act (K, M)
    source: str = ""  # where the numbers come from

    def slowdown(self, act_kr: bool, core_left: bool, carried: bool) -> float:
        """Extra cost per multiply-add, in units of ``mac``, of a form over the plain one."""
        if not (act_kr or core_left):
            return 0
        pair: tuple[float, float] = getattr(self, FORMS[(act_kr, core_left)])
        return pair[carried]

    def as_json(self) -> dict:
        d = asdict(self)
        return {"format": FORMAT, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


CPU = CostTable(
    "cpu",
    copy=2,
    scattered=5,
    form=1,
    mac=0.1,
    act_t=(0, 0.1),
    out_t=(0, 0.1),
    both_t=(0.3, 0.3),
    source="built-in: measured on CPU (float32, 1-2 threads)",
)
CUDA = CostTable(
    "cuda",
    copy=2,
    scattered=5,
    form=0,
    mac=0.1,
    act_t=(0, 0),
    out_t=(0, 0),
    both_t=(0, 0),
    source="built-in, unmeasured: plain and transposed forms priced alike, copies as on CPU",
)
BUILTIN = {"cpu": CPU, "cuda": CUDA}

_NUMBERS = ("copy", "scattered", "form", "mac")
_PAIRS = tuple(FORMS.values())
_chosen: dict[str, CostTable] = {}  # es.use_cost_table's tables, by device type
_files: dict[str, tuple[tuple[int, int], CostTable]] = {}  # path -> ((mtime_ns, size), table) read from disk


def _number(where: str, key: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise CostTableError(f"{where}: key {key!r} must be a finite number >= 0, got {v!r}; {_fix(where)}")
    return v


def _fix(where: str) -> str:
    return f"rewrite it with {CALIBRATE}" if where.startswith("cost table ") else "see einstruct.layers.costs"


def from_json(d: object, where: str = "cost table") -> CostTable:
    """A table from its JSON object (as :meth:`CostTable.as_json` writes it); ``where`` names it in errors."""
    if not isinstance(d, dict):
        raise CostTableError(f"{where}: expected a JSON object with the keys of a cost table; {_fix(where)}")
    known = {f.name for f in fields(CostTable)} | {"format"}
    for key in d:
        if key not in known:
            raise CostTableError(f"{where}: unknown key {key!r} (a cost table has {', '.join(sorted(known))})")
    if d.get("format", FORMAT) != FORMAT:
        raise CostTableError(f"{where}: key 'format' must be {FORMAT!r}, got {d['format']!r}; {_fix(where)}")
    missing = [k for k in ("device", *_NUMBERS, *_PAIRS) if k not in d]
    if missing:
        raise CostTableError(f"{where}: missing key {missing[0]!r}; {_fix(where)}")
    device = d["device"]
    if not isinstance(device, str) or not device.isidentifier():
        raise CostTableError(f"{where}: key 'device' must be a torch device type such as 'cpu', got {device!r}")
    source = d.get("source", "")
    if not isinstance(source, str):
        raise CostTableError(f"{where}: key 'source' must be a string, got {source!r}")
    copy, scattered, form, mac = (_number(where, k, d[k]) for k in _NUMBERS)
    act_t, out_t, both_t = (_pair(where, k, d[k]) for k in _PAIRS)
    return CostTable(device, copy, scattered, form, mac, act_t, out_t, both_t, source)


def _pair(where: str, key: str, v: object) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise CostTableError(f"{where}: key {key!r} must be a pair [rows, carried] of numbers >= 0, got {v!r}")
    return _number(where, key, v[0]), _number(where, key, v[1])


def load(path: str | os.PathLike) -> CostTable:
    """The table a JSON file holds (as ``python -m benchmarks.layers --calibrate`` writes it)."""
    where = f"cost table {os.fspath(path)}"
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise CostTableError(f"{where} cannot be read ({e.strerror}); write one with {CALIBRATE}") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise CostTableError(f"{where} is not JSON ({e}); {_fix(where)}") from None
    return from_json(d, where)


def save(table: CostTable, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(table.as_json(), f, indent=1)
        f.write("\n")


def use_cost_table(table: CostTable | str | os.PathLike | None) -> CostTable | None:
    """Plan layers built from now on (and layers that move) on ``table``'s device with ``table`` (a
    :class:`CostTable` or a JSON file's path); ``None`` goes back to the environment and the built-ins."""
    if table is None:
        _chosen.clear()
        return None
    if not isinstance(table, CostTable):
        table = load(table)
    _chosen[table.device] = table
    return table


def _from_env() -> dict[str, CostTable]:
    out = {}
    for path in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        try:
            st = os.stat(path)
        except OSError as e:
            raise CostTableError(f"{ENV} names {path}, which cannot be read ({e.strerror}); {CALIBRATE}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = _files.get(path)
        if hit is None or hit[0] != stamp:
            hit = _files[path] = (stamp, load(path))
        out[hit[1].device] = hit[1]
    return out


def cost_table(device_type: str) -> CostTable:
    """The table a layer on ``device_type`` is planned with: es.use_cost_table's, else the environment's, else
    the built-in one (``cpu``'s for a device type with none)."""
    env = _from_env() if os.environ.get(ENV) else {}
    for device in (device_type, "cpu"):
        table = _chosen.get(device) or env.get(device) or BUILTIN.get(device)
        if table is not None:
            return table
    return CPU
