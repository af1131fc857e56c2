"""Every option of a structure search, with its default and help text: one frozen dataclass, ``Settings``.

The command line (``python -m search.run``) builds its options from it, ``search.run_search`` takes and checks
it, study.json records it and the report reads it; nothing else states a default. A *keyed* option defines the
study: it is stored in the study's database when the study is created and must match on every resume. The
others (device, heartbeat, checkpoints) belong to each process.

    from search.settings import Settings
    s = Settings(budget=1e13, task="regression")   # any field left out keeps its default
    s.check()                                      # SearchError, one line naming the option, if one cannot work
    search.run_search("my-study", settings=s)      # or search.run_search("my-study", budget=1e13, ...)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields

from .errors import SearchError

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp")
MAX_TRIALS = 100_000  # planned trials over all levels: more is a typo, or a study that cannot finish
MAX_SEED = 2**32 - 1  # seeds are 0 .. 2^32 - 1 (numpy's range); torch and Optuna take them all


def _tasks() -> tuple[str, ...]:
    from .tasks import NAMES

    return NAMES


def _spaces() -> tuple[str, ...]:
    from .space import SPACES

    return tuple(SPACES)


def _compile_modes() -> tuple[str, ...]:
    from .step import COMPILE_MODES

    return COMPILE_MODES


def _option(default, help: str, *, keyed: bool = False, choices=None, open_choices: bool = False):
    """A Settings field: its default, its help text (without the default, which --help adds), whether it is
    keyed, and its choices (a tuple, or a function giving them, called only when they are needed);
    ``open_choices``: a value outside them may name a file or a Python object (``module:NAME``)."""
    return field(default=default, metadata=_meta(help, keyed=keyed, choices=choices, open_choices=open_choices))


def _meta(help: str, *, keyed: bool = False, choices=None, open_choices: bool = False) -> dict:
    return {"help": help, "keyed": keyed, "choices": choices, "open_choices": open_choices}


@dataclass(frozen=True)
class Settings:
    """The options of a search (see the module); every field has its default."""

    task: str = _option("regression", "task the candidates train on", keyed=True, choices=_tasks)
    data: str | None = _option(None, "data path for lm (a text or .bin file) and cifar (a folder)", keyed=True)
    budget: float = _option(6e10, "total training FLOPs over all trials, never exceeded", keyed=True)
    levels: int = _option(3, "compute levels, >= 3", keyed=True)
    ratio: float = _option(3.0, "compute factor between levels, >= 2", keyed=True)
    top_trials: int = _option(
        7,
        "trials at the top level; each level below runs ratio times as many (raised to the references + 1)",
        keyed=True,
    )
    sampler: str = _option("tpe", "Optuna sampler (tpe is multivariate)", keyed=True, choices=SAMPLERS)
    seed: int = _option(0, "seed for sampling and training, 0 .. 2^32 - 1", keyed=True)
    space: str = _option(
        "full",
        "search space: a built-in name (full, theta, btt: beta = delta = 0, moe and mpo3: opt-in), a space file "
        "(myspace.toml) or a Python object (package.module:SPACE)",
        keyed=True,
        choices=_spaces,
        open_choices=True,
    )
    min_steps: int = _option(20, "candidates with fewer steps at a level's allowance are rejected", keyed=True)
    target_steps: int = _option(300, "steps the references' widths aim for", keyed=True)
    task_settings: dict = field(
        default_factory=dict,
        metadata=_meta("the task's own settings as a JSON object, e.g. '{\"batch\": 64}'", keyed=True),
    )
    confirm_share: float = _option(
        0.72,
        "share of the budget kept for the confirmation phase (retraining the confirmed structures on fresh seeds "
        "at widths around their best); 0: no confirmation and no verdict",
        keyed=True,
    )
    confirm_top: int = _option(
        2,
        "structures confirmed by exploration loss over the upper levels (besides the best named one and dense)",
        keyed=True,
    )
    confirm_seeds: int = _option(3, "fresh training seeds per confirmed run (seed + 1, seed + 2, ...)", keyed=True)
    confirm_widths: int = _option(
        3, "grid widths per confirmed structure and level, bracketing its best exploration width", keyed=True
    )
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    heartbeat: int = _option(
        10,
        "seconds between a worker's heartbeats; a worker that misses 3 is taken for dead and its trial retried "
        "from its checkpoint; 0: off (embedded storage only)",
    )
    checkpoints: int = _option(10, "times a trial saves its state, so that a retry repeats at most 1/checkpoints of it")
    checkpoint_steps: int = _option(50, "fewest steps between two checkpoints of a trial (each is a storage write)")
    compile: str = _option(
        "off",
        "torch.compile each trial's training step: off (measured slower on CPU at the search's sizes), default, "
        "reduce-overhead (CUDA graphs, CUDA only)",
        choices=_compile_modes,
    )
    threads: int = _option(
        0,
        "intra-op CPU threads per trial: 0 = auto (one thread for a small step, where more are slower, else this "
        "worker's share of the cores; search.threads), or a number",
    )

    # ---- reading and writing --------------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict, *, strict: bool = True) -> Settings:
        """Settings from a dict of options (the rest default). ``strict``: an unknown name is an error; else
        (stored settings of an older or newer version) it is ignored."""
        if strict:
            check_names(values)
        names = cls.names()
        return cls(**{k: v for k, v in normal(values).items() if k in names})

    def as_dict(self) -> dict:
        """Every option by name, as study.json records it (a fresh copy)."""
        return {f.name: _copy(getattr(self, f.name)) for f in fields(self)}

    def keyed(self) -> dict:
        """The options that define the study (stored in its database)."""
        return {k: v for k, v in self.as_dict().items() if k in KEYED}

    # ---- checking -------------------------------------------------------------------------------

    def check(self) -> Settings:
        """Refuse options that cannot make sense, with one line naming the option and the fix (SearchError),
        before anything is built; returns self. Covers each option's type and range, numbers so large or small
        that arithmetic on them overflows or underflows, plans of more than MAX_TRIALS trials, and devices that
        cannot train (the meta device, a GPU index that is not there)."""
        check(self.as_dict())
        return self


def check_names(values) -> None:
    """Refuse option names that are not Settings fields."""
    names = Settings.names()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SearchError(f"unknown setting(s) {', '.join(unknown)}; settings are {', '.join(names)}")


def normal(values: dict) -> dict:
    """Options as study.json stores them: a path object (data=Path(...)) becomes its string."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}


def _copy(v):
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else v


def option(name: str):
    """The dataclass field of option ``name``: ``.default``, ``.metadata['help']`` and the rest."""
    return next(f for f in fields(Settings) if f.name == name)


def default(name: str):
    f = option(name)
    return f.default_factory() if f.default is MISSING else f.default


def choices(name: str) -> tuple | None:
    c = option(name).metadata["choices"]
    return c() if callable(c) else c


DEFAULTS = Settings().as_dict()  # by name, for code that reads a settings dict
KEYED = tuple(f.name for f in fields(Settings) if f.metadata["keyed"])  # must match when a study is resumed


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(name: str) -> str:
    d = default(name)
    return (
        "none" if d is None else json.dumps(d) if isinstance(d, dict) else f"{d:g}" if isinstance(d, float) else str(d)
    )


def help_text(name: str) -> str:
    """An option's help with its default, as --help shows it."""
    return f"{option(name).metadata['help']} (default {shown_default(name)})"


def markdown_table() -> str:
    """README's table of the options (tests/search/test_settings.py checks that README holds exactly this)."""
    out = ["| option (Python) | default | keyed | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        what = f.metadata["help"].replace("|", "\\|")
        keyed = "yes" if f.metadata["keyed"] else ""
        out.append(f"| `{flag(f.name)}` (`{f.name}`) | `{shown_default(f.name)}` | {keyed} | {what} |")
    return "\n".join(out) + "\n"


def to_argv(given: dict) -> list[str]:
    """Command-line arguments that give these options (None: not given), as the command line reads them back."""
    out = []
    for k, v in given.items():
        if v is not None:
            out += [
                flag(k),
                json.dumps(v) if isinstance(v, (dict, list)) else repr(v) if isinstance(v, float) else str(v),
            ]
    return out


def described(stored: dict) -> list[tuple[str, object, str]]:
    """(name, value, help) of stored settings (study.json's), the options in Settings order, then any name this
    version does not know (a study of another version) with no help; what the report shows."""
    known = [(f.name, stored[f.name], f.metadata["help"]) for f in fields(Settings) if f.name in stored]
    return known + [(k, stored[k], "") for k in sorted(set(stored) - set(Settings.names()))]


# ---- the checks -------------------------------------------------------------------------------------


def _plan_trials(top: int, levels: int, ratio: float, stop: int) -> int | None:
    """Trials the plan runs (the top level runs ``top``, each level below ``ratio`` times as many), or None when
    they are more than ``stop`` (counted without overflow: counting ends as soon as the sum passes it)."""
    total, n = 0, float(top)
    for _ in range(levels):
        if n > stop:
            return None
        total += math.floor(n + 1e-9)
        if total > stop:
            return None
        n *= ratio
    return total


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _whole(v, low: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= low


def check(cfg: dict) -> None:
    """``Settings.check`` on a dict holding every option (defaults < stored < given, as ``for_study`` merges
    them)."""
    from .budget import plan_levels

    budget, levels, ratio, top = cfg["budget"], cfg["levels"], cfg["ratio"], cfg["top_trials"]
    if _number(budget) and 0 < budget < 1:
        raise SearchError(
            f"--budget {budget!r} is less than one FLOP; it is the total training FLOPs of all "
            "trials, e.g. --budget 1e13"
        )
    if _number(ratio) and ratio >= 2 and _whole(levels, 3) and _whole(top, 1):
        n = _plan_trials(top, levels, ratio, MAX_TRIALS)  # at least: search.loop raises top to the references + 1
        if n is None:
            raise SearchError(
                f"--top-trials {top} with --levels {levels} and --ratio {ratio:g} plans more than the {MAX_TRIALS:,} "
                f"trials a study may run (the top level runs {top}, each level below {ratio:g} times as many as the "
                "one above); lower --top-trials, --levels or --ratio"
            )
    plan_levels(budget, levels, ratio, top)  # each value's type and range; nothing overflows any more
    for key in ("task", "sampler", "space", "device"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise SearchError(f"{flag(key)} must be a name, got {cfg[key]!r}; see --help for the choices")
    if cfg["sampler"] not in SAMPLERS:
        raise SearchError(f"unknown sampler {cfg['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg["data"] is not None and not isinstance(cfg["data"], str):
        raise SearchError(f"--data must be a path, got {cfg['data']!r}")
    if not isinstance(cfg["task_settings"], dict):
        raise SearchError(
            f"--task-settings must be a JSON object such as '{{\"batch\": 64}}', got {cfg['task_settings']!r}"
        )
    seed = cfg["seed"]
    if not _whole(seed, 0) or seed > MAX_SEED:
        raise SearchError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    for key, what in (
        ("min_steps", "candidates with fewer steps are rejected"),
        ("target_steps", "the references' widths aim for this many steps"),
    ):
        if not _whole(cfg[key], 1):
            raise SearchError(f"{flag(key)} must be a whole number of steps, 1 or more ({what}), got {cfg[key]!r}")
    share = cfg["confirm_share"]
    if not _number(share) or not 0 <= share < 1:
        raise SearchError(f"--confirm-share must be a number from 0 to below 1 (a share of the budget), got {share!r}")
    for key, low in (("confirm_top", 0), ("confirm_seeds", 2), ("confirm_widths", 1)):
        if not _whole(cfg[key], low):
            raise SearchError(f"{flag(key)} must be a whole number, {low} or more, got {cfg[key]!r}")
    if not _whole(cfg["heartbeat"], 0):
        raise SearchError(f"--heartbeat must be a number of seconds >= 1 (0: off), got {cfg['heartbeat']!r}")
    if not _whole(cfg["threads"], 0):
        raise SearchError(f"--threads must be a whole number of threads, 1 or more (0: auto), got {cfg['threads']!r}")
    for key in ("checkpoints", "checkpoint_steps"):
        if not _whole(cfg[key], 1):
            raise SearchError(f"{flag(key)} must be a whole number, 1 or more, got {cfg[key]!r}")
    from .train import check_device

    dev = check_device(cfg["device"])
    if cfg["compile"] == "reduce-overhead" and dev.type != "cuda":
        raise SearchError("--compile reduce-overhead uses CUDA graphs and needs --device cuda; use --compile default")


# ---- a study's settings: defaults < stored < given --------------------------------------------------


def for_study(name: str, folder: str, given: dict, stored: dict | None = None) -> dict:
    """Every option of study ``name``: defaults < stored settings < given ones (None: not given); a given keyed
    option that contradicts the stored study is an error.

    ``stored``: the settings kept in the study's database, which are the study's once it exists; without them
    (a study from before they were stored there, or a new one), the folder's study.json. A stored name this
    version does not know is skipped, and one it lacks takes its default: studies of other versions resume.
    """
    check_names(set(given) - {"storage"})
    path = os.path.join(folder, "study.json")
    if stored is None and os.path.exists(path):
        stored = read_study_json(path)
    stored = stored or {}
    check_same(name, stored, {k: v for k, v in given.items() if v is not None})
    out = Settings().as_dict()
    if stored and "confirm_share" not in stored:
        out["confirm_share"] = 0.0  # a study from before the confirmation phase resumes as it was planned
    out.update({k: v for k, v in stored.items() if k in out})
    out.update({k: v for k, v in given.items() if v is not None and k in out})
    return out


def check_same(name: str, stored: dict, given: dict) -> None:
    """Refuse a keyed option of ``given`` that differs from the ``stored`` study's (numbers within 1e-9)."""
    for k in KEYED:
        if k in given and k in stored and differs(given[k], stored[k]):
            raise SearchError(
                f"study {name!r} already exists with {k}={stored[k]!r}, not {given[k]!r}; run it with the same "
                "settings to resume (leave the option out to take the study's), or pick a new --study name"
            )


def read_study_json(path: str) -> dict:
    """The settings a study.json records."""
    try:
        with open(path) as f:
            stored = json.load(f).get("settings", {})
        if not isinstance(stored, dict):
            raise ValueError("its settings are not a JSON object")
    except (OSError, ValueError, AttributeError) as e:
        raise SearchError(
            f"{path} cannot be read as this study's settings ({e}); restore it, or delete it to "
            "start the study's settings afresh"
        ) from None
    return stored


def differs(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(float(a), float(b), rel_tol=1e-9)
    try:  # as stored: a tuple and the list it becomes in JSON are the same setting
        return json.loads(json.dumps(a, sort_keys=True)) != json.loads(json.dumps(b, sort_keys=True))
    except (TypeError, ValueError):
        return a != b
