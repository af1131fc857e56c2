"""A family with one integer argument from a fixed grid, built by an einstruct preset (BTT's rank, Monarch's
blocks): every method of the family protocol from five facts, so such a family is a few lines."""

from __future__ import annotations

from collections.abc import Callable

import einstruct as es

from .base import Family


class GridFamily(Family):
    """``key`` drawn from ``values`` (Optuna categorical), built as ``preset(**{key: value})``, labelled
    ``name(short=value)``, its value in the trials.csv column ``key``; ``reference`` is queued at every level."""

    def __init__(self, name: str, label: str, key: str, short: str, values, preset: Callable, reference: int):
        self.name, self.label, self.group = name, label, label
        self.key, self.short, self.values, self.preset, self.reference = key, short, tuple(values), preset, reference
        self.keys = self.legacy_columns = (key,)

    def suggest(self, trial):
        return {self.key: trial.suggest_categorical(self.key, list(self.values))}

    def params_for(self, args):
        return {self.key: args[self.key]}

    def random_params(self, rng):
        return {self.key: rng.choice(self.values)}

    def normalize(self, args):
        return {self.key: int(args[self.key])}

    def build(self, args) -> es.Spec:
        return self.preset(**{self.key: args[self.key]})

    def structure_label(self, args) -> str:
        return f"{self.name}({self.short}={args[self.key]})"

    def columns(self, args):
        return {self.key: args[self.key]}

    def from_columns(self, row):
        return {self.key: int(float(row[self.key]))}

    def references(self):
        return ({self.key: self.reference},)

    def cheap_points(self):
        return tuple({self.key: v} for v in self.values)
