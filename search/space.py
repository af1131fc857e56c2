"""The search space: structure families (search.families) and width, sampled by Optuna trials.

A space is a built-in name or a user's space (a TOML file or a Python entry point, search.families.loader):

- ``full``: theta (the NeurIPS family) and the presets that are not theta points: dense, monarch (b blocks) and
  btt (integer rank r). Low rank, Kronecker and Tensor-Train are theta points.
- ``theta``: theta only; ``btt``: theta's BTT subspace (beta = delta = 0).
- ``moe`` (opt-in): dense, btt, btt_moe (every structured linear a BTT-MoE) and moe (standard MoE: each MLP is
  E dense FFNs; tasks with such a model, i.e. lm), over (experts, active). Both run the tiled dispatch (no host
  read in the step), so a candidate pays for the experts it runs plus the tiles' padding; per FLOP they train
  slower on a CPU.
- ``mpo3`` (opt-in): the continuous three-core family (docs/mpo3.md) and dense.

Define-by-run sampling: ``family`` (when the space has several), ``width``, then the family's own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SearchError
from .families import Candidate, Family, registry
from .families.loader import is_user_space
from .families.loader import load as load_user_space
from .families.theta import KEYS as THETA_KEYS
from .families.theta import canonical, theta_from_unit

__all__ = ["THETA_KEYS", "Candidate", "Space", "canonical", "make_space", "references", "theta_from_unit"]
SPACES = registry.SPACES


@dataclass(frozen=True)
class Space:
    name: str
    members: tuple[Family, ...]
    widths: tuple[int, ...]
    refs: tuple[tuple[Family, dict], ...] = ()

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.members)

    def family(self, name: str) -> Family:
        for f in self.members:
            if f.name == name:
                return f
        raise SearchError(f"family {name!r} is not in space {self.name} ({', '.join(self.families)})")

    def by_name(self) -> dict[str, Family]:
        return {f.name: f for f in self.members}

    def suggest(self, trial) -> Candidate:
        """Define-by-run sampling on an Optuna trial."""
        names = self.families
        name = trial.suggest_categorical("family", list(names)) if len(names) > 1 else names[0]
        width = trial.suggest_categorical("width", list(self.widths))
        fam = self.family(name)
        return Candidate.of(fam, width, fam.suggest(trial))

    def random_params(self, rng) -> dict:
        """Uniformly random Optuna params of this space (``rng``: a random.Random), to force exploration."""
        name = rng.choice(self.families)
        p: dict = {"width": rng.choice(self.widths)}
        if len(self.members) > 1:
            p["family"] = name
        p.update(self.family(name).random_params(rng))
        return p

    def params_for(self, cand: Candidate) -> dict:
        """Optuna params that make ``suggest`` return ``cand`` (for enqueuing references)."""
        p: dict = {"width": cand.width}
        if len(self.members) > 1:
            p["family"] = cand.family
        p.update(self.family(cand.family).params_for(cand.arguments))
        return p

    def cheap_candidates(self, width: int) -> list[Candidate]:
        """Every family's points that hold its cheapest candidate, at ``width`` (search.budget)."""
        return [Candidate.of(f, width, a) for f in self.members for a in f.cheap_points()]


def make_space(name: str, widths) -> Space:
    """A built-in space by name, or a user's space from a .toml file or a pkg.module:NAME entry point."""
    if name in SPACES:
        fams = registry.builtin_space(name)
        refs = tuple((f, r) for f in sorted(fams, key=registry.order) for r in f.references())
        return Space(name, fams, tuple(widths), refs)
    if is_user_space(name):
        fams, refs = load_user_space(name)
        return Space(name, fams, tuple(widths), refs)
    raise SearchError(
        f"unknown space {name!r}; choose one of {', '.join(SPACES)}, a space file (.toml) or pkg.module:NAME"
    )


def references(space: Space) -> list[Candidate]:
    """The reference structures that belong to this space (width 0: filled in later)."""
    return [Candidate.of(f, 0, a) for f, a in space.refs]
