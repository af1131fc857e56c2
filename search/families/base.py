"""What a structure family is (one object: name, parameters, builder, label, columns, group) and a Candidate.

A family turns an Optuna trial into its arguments (``suggest``), and back (``params_for``); builds an einstruct
Spec (or an es.MoEConfig, or None for dense) from them (``build``); names the structure (``structure_label``),
its trials.csv columns (``columns``: the family's own legacy columns; every family also gets ``family_params``,
its arguments as JSON) and its report group (``group_of``: the family-level ``group`` unless the family derives
per-structure groups, as theta does for the THEORY 2 named points). ``references`` are the arguments of the
structures queued first at every level; ``cheap_points`` the arguments that hold the family's cheapest
candidate, for the budget check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import einstruct as es

from ..errors import SearchError


class Family:
    """The protocol every family implements; subclasses override what they need (see the module docstring)."""

    name: str = ""
    label: str = ""  # the family-level name people read ("BTT"), e.g. in the report
    group: str = ""  # the family-level report group (default: the label)
    groups: tuple[str, ...] = ()  # every group the family may give, in report order (default: (group,))
    legacy_columns: tuple[str, ...] = ()  # trials.csv columns of its own (before family_params existed)
    continuous: bool = False  # a cloud of points: the taxonomy plot does not annotate its catch-all group
    keys: tuple[str, ...] = ()  # its arguments, in order

    def report_groups(self) -> tuple[str, ...]:
        return self.groups or (self.group or self.label or self.name,)

    # ---- sampling -------------------------------------------------------------------
    def suggest(self, trial) -> dict:
        return {}

    def params_for(self, args: dict) -> dict:
        return {}

    def random_params(self, rng) -> dict:
        return {}

    def normalize(self, args: dict) -> dict:
        """The arguments in the family's order (a candidate rebuilt from JSON equals the one proposed)."""
        missing = [k for k in self.keys if k not in args]
        extra = [k for k in args if k not in self.keys]
        if missing or extra:
            raise SearchError(
                f"family {self.name} takes the arguments {', '.join(self.keys) or '(none)'}; got "
                f"{', '.join(args) or '(none)'}"
            )
        return {k: args[k] for k in self.keys}

    # ---- building and naming --------------------------------------------------------
    def build(self, args: dict) -> es.Spec | es.MoEConfig | None:
        raise NotImplementedError

    def structure_label(self, args: dict) -> str:
        if not args:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_short(v)}" for k, v in args.items()) + ")"

    def columns(self, args: dict) -> dict:
        return {}

    def from_columns(self, row: dict) -> dict:
        """Arguments from a trials.csv row written before ``family_params`` existed (built-ins only)."""
        return {}

    def group_of(self, args: dict) -> str:
        return self.group or self.label or self.name

    # ---- references and the budget check ------------------------------------------------
    def references(self) -> tuple[dict, ...]:
        return ()

    def cheap_points(self) -> tuple[dict, ...]:
        return ()


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Candidate:
    """One point of a space: a family, its arguments and a width. Equal when name, width and arguments are."""

    family: str
    width: int
    args: tuple[tuple[str, Any], ...] = ()
    fam: Family | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, fam: Family, width: int, args: dict | None = None) -> Candidate:
        return cls(fam.name, int(width), tuple(fam.normalize(args or {}).items()), fam)

    @classmethod
    def from_row(cls, row: dict, families: dict | None = None) -> Candidate:
        """The candidate of a trials.csv row (or a trial record); ``families``: name -> Family (a study's own
        families), else the built-in registry."""
        from .registry import lookup

        name = str(row["family"])
        fam = (families or {}).get(name) or lookup(name)
        raw = row.get("family_params")
        if raw not in (None, ""):
            try:
                args = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except (ValueError, TypeError):
                raise SearchError(f"family_params {raw!r} of a {name} row is not a JSON object") from None
        else:
            args = fam.from_columns(row)
        return cls.of(fam, int(float(row["width"])), args)

    def at(self, width: int) -> Candidate:
        return Candidate(self.family, int(width), self.args, self.fam)

    @property
    def arguments(self) -> dict:
        return dict(self.args)

    def spec(self) -> es.Spec | es.MoEConfig | None:
        """The einstruct Spec (None for dense), or an es.MoEConfig for the MoE families (tiled dispatch).
        May raise SpecError for an invalid point."""
        return self.fam.build(self.arguments)

    def structure_spec(self) -> es.Spec:
        """A Spec to compile for the structure's table and omega/psi/nu: an MoE's weight structure (rank-E
        BTT for btt_moe, dense for moe), dense for dense."""
        spec = self.spec()
        if spec is None:
            return es.presets.dense()
        return spec.weight_spec if isinstance(spec, es.MoEConfig) else spec

    @property
    def label(self) -> str:
        return self.fam.structure_label(self.arguments)

    @property
    def group(self) -> str:
        return self.fam.group_of(self.arguments)

    def columns(self) -> dict:
        from .registry import legacy_columns

        return {
            "family": self.family,
            "structure": self.label,
            **dict.fromkeys(legacy_columns(), ""),
            **self.fam.columns(self.arguments),
            "width": self.width,
            "family_params": json.dumps(self.arguments, sort_keys=True, default=str),
            "group": self.group,
        }
