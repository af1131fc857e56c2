"""StructureConfig: what es.structure() is asked to do, as a frozen value that round-trips through JSON.

    cfg = es.StructureConfig(spec="btt", spec_args={"rank": 4}, select="blocks.*", normalize=True)
    model = es.structure(model, cfg)
    cfg == es.StructureConfig.from_json(cfg.to_json())   # True

Also the JSON form of a Spec (:func:`spec_to_dict` / :func:`spec_from_dict`: the named einsum, each axis's
size as the size grammar writes it, the label and the theta), shared with the structure record that
es.save writes. Torch-free, like the compiler.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from . import presets
from .errors import SpecError
from .spec import Spec

if TYPE_CHECKING:
    from .layers.moe.config import MoEConfig

FORMAT_VERSION = 1
INITS = ("mup", "project")
_MODES = ("all", "all_but_last", "intermediate")


def project_weights(init, copy_weights: bool = False) -> bool:
    """Whether structure() projects pretrained weights: ``init='project'``, or its older name
    ``copy_weights=True`` (``init=None``: whatever copy_weights says)."""
    if init is None:
        return bool(copy_weights)
    if init not in INITS:
        raise SpecError(
            f"init must be 'mup' (fresh cores at their muP stds) or 'project' (the pretrained weights projected "
            f"onto the structure), got {init!r}"
        )
    if copy_weights and init != "project":
        raise SpecError("copy_weights=True is init='project'; it cannot be combined with init='mup': drop one")
    return init == "project"


def only_config(**given) -> None:
    """Refuse arguments given to ``structure(model, config)`` beside the config (each name -> whether set)."""
    extra = [k for k, v in given.items() if v is not False and v is not None]
    if extra:
        raise SpecError(
            f"structure(model, config) takes every setting from the StructureConfig; got {extra[0]}= as well: "
            "put it in the config (dataclasses.replace(config, ...))"
        )


def spec_to_dict(spec: Spec) -> dict:
    """A JSON-ready dict that :func:`spec_from_dict` turns back into an equal Spec."""
    named = ",".join([spec.x] + [f"{c.name}:{c.axes}" for c in spec.cores]) + "->" + spec.y
    out = {"einsum": named, "sizes": {a: str(s) for a, s in spec.size_items}, "label": spec.label}
    if spec.theta is not None:
        out["theta"] = [str(Fraction(t)) for t in spec.theta]
    return out


def spec_from_dict(d) -> Spec:
    """The Spec of :func:`spec_to_dict`'s dict."""
    if not isinstance(d, dict) or not isinstance(d.get("einsum"), str) or not isinstance(d.get("sizes"), dict):
        raise SpecError(
            f"a spec in JSON is an object with 'einsum' (a string) and 'sizes' (axis -> size), got {d!r:.120}"
        )
    theta = d.get("theta")
    theta = None if theta is None else tuple(Fraction(str(t)) for t in theta)
    return Spec(d["einsum"], sizes=dict(d["sizes"]), label=str(d.get("label", "")), theta=theta)


@dataclass(frozen=True)
class StructureConfig:
    """Everything :func:`einstruct.structure` takes, stored with the weights (like PEFT's ``LoraConfig``).

    - ``spec``: an es.Spec, a preset name (``"btt"``), or None (only with ``select`` returning Specs, or an
      MoE of dense experts); ``spec_args``: the preset's arguments (``{"rank": 4}``), only with a name.
    - ``select``: a mode (``"all_but_last"``, ``"all"``, ``"intermediate"``), a glob on module names, a
      compiled regex, a list of globs (PEFT's ``target_modules``: a module is chosen when one matches its
      qualified name), or a callable ``(name, module)`` (not JSON-serialisable; the structure record that
      :func:`einstruct.save` writes names the layers it chose, so the model can still be rebuilt).
    - ``moe``: an :class:`einstruct.MoEConfig` or a dict of its fields; ``normalize``: weight normalisation;
      ``init``: ``"mup"`` (fresh muP draws) or ``"project"`` (each layer's pretrained weight projected onto
      the structure); ``tied``: ``"skip"`` or ``"untie"``; ``layer_options``: other StructuredLinear /
      MoE-layer arguments (``pad_tolerance``, ``init_scale``, ``low_rank_init``, ``zero_init``, ...).
    """

    spec: Spec | str | None = "btt"
    spec_args: dict = field(default_factory=dict)
    select: str | re.Pattern | tuple | Callable | None = "all_but_last"
    moe: MoEConfig | None = None
    normalize: bool = False
    init: str = "mup"
    tied: str = "skip"
    layer_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.spec is not None and not isinstance(self.spec, (Spec, str)):
            raise SpecError(
                f"StructureConfig: spec must be an es.Spec, a preset name such as 'btt', or None; "
                f"got {type(self.spec).__name__}"
            )
        if not isinstance(self.spec_args, dict):
            raise SpecError(f"StructureConfig: spec_args must be a dict such as {{'rank': 4}}, got {self.spec_args!r}")
        if self.spec_args and not isinstance(self.spec, str):
            raise SpecError("StructureConfig: spec_args are a preset's arguments; give spec as a preset name with them")
        if isinstance(self.spec, str):
            presets.get(self.spec, **self.spec_args)  # unknown names and arguments fail here, not at structure()
        if isinstance(self.select, list):
            object.__setattr__(self, "select", tuple(self.select))
        sel = self.select
        if isinstance(sel, tuple) and not (sel and all(isinstance(s, str) for s in sel)):
            raise SpecError(f"StructureConfig: a list select must be a non-empty list of glob strings, got {sel!r}")
        if not isinstance(sel, (str, re.Pattern, tuple)) and not callable(sel):
            raise SpecError(
                "StructureConfig: select must be a mode such as 'all_but_last', a glob, a compiled regex, a list "
                f"of globs or a callable(name, module); got {type(sel).__name__}"
            )
        if self.moe is not None:
            from .layers.moe.config import MoEConfig

            object.__setattr__(self, "moe", MoEConfig.of(self.moe))
        if not isinstance(self.normalize, bool):
            raise SpecError(f"StructureConfig: normalize must be True or False, got {self.normalize!r}")
        if self.init is None:
            raise SpecError("StructureConfig: init must be 'mup' (fresh muP draws) or 'project', got None")
        project_weights(self.init)  # the one check of init's values
        if not isinstance(self.layer_options, dict):
            raise SpecError(f"StructureConfig: layer_options must be a dict, got {type(self.layer_options).__name__}")
        if "normalize" in self.layer_options:
            raise SpecError("StructureConfig: give normalize as its own field, not in layer_options")

    # ---- what structure() receives -----------------------------------------------------------
    def resolved_spec(self) -> Spec | None:
        """The Spec this config names (a preset built with its arguments)."""
        return presets.get(self.spec, **self.spec_args) if isinstance(self.spec, str) else self.spec

    def resolved_select(self):
        """``select`` as structure() takes it (a list of globs becomes a callable)."""
        if isinstance(self.select, tuple):
            import fnmatch

            pats = self.select
            return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in pats)
        return self.select

    def structure_kwargs(self) -> dict:
        """The keyword arguments of the equivalent ``es.structure(model, spec, **kwargs)`` call."""
        kw = dict(self.layer_options)
        if self.normalize:
            kw["normalize"] = True
        return dict(select=self.resolved_select(), init=self.init, tied=self.tied, moe=self.moe, **kw)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (see :meth:`from_dict`); a callable select cannot be written and is refused."""
        sel: Any = self.select
        if isinstance(sel, re.Pattern):
            sel = {"regex": sel.pattern}
        elif isinstance(sel, tuple):
            sel = list(sel)
        elif not isinstance(sel, str):
            raise SpecError(
                "StructureConfig.to_json: a callable select cannot be written to JSON; use a glob, a regex or a "
                "list of module-name globs, or save the structured model with es.save (its record names the "
                "layers the callable chose)"
            )
        spec = spec_to_dict(self.spec) if isinstance(self.spec, Spec) else self.spec
        moe = None
        if self.moe is not None:
            moe = {f.name: getattr(self.moe, f.name) for f in fields(self.moe)}
        out = {
            "format_version": FORMAT_VERSION,
            "spec": spec,
            "spec_args": dict(self.spec_args),
            "select": sel,
            "moe": moe,
            "normalize": self.normalize,
            "init": self.init,
            "tied": self.tied,
            "layer_options": dict(self.layer_options),
        }
        try:
            json.dumps(out)
        except TypeError as e:
            raise SpecError(
                f"StructureConfig.to_json: a value is not JSON-serialisable ({e}); use plain numbers"
            ) from e
        return out

    def to_json(self, **dumps_kwargs) -> str:
        return json.dumps(self.to_dict(), **dumps_kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> StructureConfig:
        if not isinstance(d, dict):
            raise SpecError(f"StructureConfig.from_dict needs a dict, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(
                f"StructureConfig: format_version {version!r} is not known to this einstruct (it reads "
                f"{FORMAT_VERSION}); upgrade einstruct"
            )
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise SpecError(f"StructureConfig: unknown field {unknown[0]!r}; fields are {', '.join(sorted(known))}")
        if isinstance(d.get("spec"), dict):
            d["spec"] = spec_from_dict(d["spec"])
        sel = d.get("select")
        if isinstance(sel, dict):
            if set(sel) != {"regex"}:
                raise SpecError(f"StructureConfig: a select object must be {{'regex': pattern}}, got {sel!r}")
            d["select"] = re.compile(sel["regex"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> StructureConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"StructureConfig.from_json: not valid JSON ({e})") from e
        return cls.from_dict(d)
