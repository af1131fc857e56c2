"""What a seeded search proposes, without training: the regression record of the built-in spaces.

``proposals(space_name)`` replays the loop's proposal logic on an in-memory Optuna study: the space's references
are enqueued at a fixed width, then each trial is asked, turned into a candidate by the space and told a
deterministic pseudo-loss (a hash of the candidate); a repeated candidate is told PRUNED and a uniformly random
point of the space is enqueued, as search.loop does. The record (candidate columns and Optuna params per trial,
random points, the budget's cheapest-candidate set) must not change when the space's code is reorganised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

LEGACY = ("family", "structure", "alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
LEGACY += ("blocks", "rank", "experts", "active", "width")
SPACES = ("full", "theta", "btt", "moe")
WIDTHS = (64, 128, 256)
TRIALS = 30


def _loss(cols: dict) -> float:
    digest = hashlib.sha1(json.dumps(cols, sort_keys=True, default=str).encode()).hexdigest()
    return 1.0 + int(digest[:8], 16) / 2**32


def proposals(name: str, trials: int = TRIALS) -> dict:
    import optuna

    from search import budget
    from search.loop import make_sampler
    from search.space import make_space, references

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = make_space(name, WIDTHS)
    refs = references(space)
    st = optuna.create_study(direction="minimize", sampler=make_sampler("tpe", 7))
    ref_params = [space.params_for(dataclasses.replace(r, width=128)) for r in refs]
    for p in ref_params:
        st.enqueue_trial(p, user_attrs={"reference": True})
    explore = random.Random(3)
    seen, out = set(), []
    for _ in range(trials):
        trial = st.ask()
        cand = space.suggest(trial)
        cols = {k: cand.columns().get(k, "") for k in LEGACY}
        key = json.dumps(cols, sort_keys=True, default=str)
        if key in seen:
            st.tell(trial, state=optuna.trial.TrialState.PRUNED)
            st.enqueue_trial(space.random_params(explore), user_attrs={"exploration": True})
        else:
            seen.add(key)
            st.tell(trial, _loss(cols))
        out.append({"columns": cols, "params": trial.params, "label": cand.label})
    rng = random.Random(11)
    return {
        "references": [r.label for r in refs],
        "reference_params": ref_params,
        "trials": out,
        "random": [space.random_params(rng) for _ in range(10)],
        "cheapest_set": [c.label for c in budget.candidates(space, refs, 64)],
    }


def record() -> dict:
    return {name: proposals(name) for name in SPACES}


if __name__ == "__main__":  # python -m tests.search._proposals > tests/search/data/proposals.json
    print(json.dumps(record(), indent=1, sort_keys=True, default=str))
