"""es.save / es.load: a structured model as a directory of safetensors weights and a JSON structure record.

    es.save(model, "ckpt")                 # ckpt/model.safetensors + ckpt/structure.json, no pickle anywhere
    model = es.load("ckpt", make_plain())  # the plain architecture (meta device is fine), structured as saved

``structure.json`` holds the structure record (:mod:`einstruct.layers.record`: each structured module's
qualified name, the dense layer it replaced, its spec with the resolved sizes, its layer and MoE
options), a ``format_version``, and the model's module tree (names and classes), against which
:func:`load` names the first module of a different architecture. ``model.safetensors`` is the model's
``state_dict`` (tensors shared between modules, such as tied embeddings, stored once). Loading copies the
saved values into the model's own tensors, so the loaded model's outputs equal the saved one's exactly;
a model built on the meta device gets the saved tensors instead (ties restored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import FORMAT_VERSION
from .errors import SpecError

WEIGHTS = "model.safetensors"
RECORD = "structure.json"


def _unwrap(model):
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile's wrapper
        model = model._orig_mod
    return model


def _tree(model: nn.Module) -> list[list[str]]:
    return [[name, type(m).__name__] for name, m in model.named_modules()]


def save(model: nn.Module, path) -> Path:
    """Write ``model`` to the directory ``path`` (created if missing): ``model.safetensors`` (every tensor
    of its state_dict) and ``structure.json`` (how it was structured). Returns the directory."""
    from safetensors.torch import save_model

    from . import __version__
    from .layers.record import model_record

    if not isinstance(model, nn.Module):
        raise SpecError(f"es.save needs an nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpecError(f"es.save writes a directory, but {str(path)!r} is a file; give a directory path")
    meta = next((k for k, v in model.state_dict().items() if v.is_meta), None)
    if meta is not None:
        raise SpecError(f"es.save: {meta!r} is on the meta device (no values to save); load or initialise it first")
    doc = {
        "format_version": FORMAT_VERSION,
        "einstruct_version": __version__,
        "layers": model_record(model)["layers"],
        "modules": _tree(model),
    }
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (RECORD + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    save_model(model, str(path / WEIGHTS), metadata={"format": "pt"})
    os.replace(tmp, path / RECORD)  # the record last: a directory with a record has its weights
    return path


def read_record(path) -> dict:
    """The parsed ``structure.json`` of a directory written by :func:`save`."""
    path = Path(path)
    for name in (RECORD, WEIGHTS):
        if not (path / name).is_file():
            raise SpecError(f"es.load: {str(path / name)!r} does not exist; give a directory written by es.save")
    try:
        doc = json.loads((path / RECORD).read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"es.load: {str(path / RECORD)!r} is not valid JSON ({e})") from e
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:
        raise SpecError(
            f"es.load: {str(path / RECORD)!r} has format_version {version!r}; this einstruct reads "
            f"{FORMAT_VERSION}: load it with the einstruct version that saved it"
        )
    return doc


def load(path, model: nn.Module) -> nn.Module:
    """Structure the plain architecture ``model`` as recorded in ``path`` and load the saved weights.

    ``model`` is the architecture before es.structure (on any device, the meta device included); it is
    changed in place and returned (a bare nn.Linear that was structured is returned as its replacement).
    A model whose modules differ from the saved one's raises a SpecError naming the first that differs.
    """
    from safetensors.torch import load_file

    from .layers import record

    if not isinstance(model, nn.Module):
        raise SpecError(f"es.load needs the model's architecture as an nn.Module, got {type(model).__name__}")
    doc = read_record(path)
    model = _unwrap(model)
    model = _restructure(model, doc["layers"])
    record.attach(model, {name: dict(e) for name, e in doc["layers"].items()})
    _check_tree(model, doc.get("modules", []))
    state = load_file(str(Path(path) / WEIGHTS), device="cpu")
    _load_state(model, state)
    return model


def _restructure(model: nn.Module, layers: dict) -> nn.Module:
    from .layers import record

    for name, e in layers.items():
        try:
            old = model.get_submodule(name) if name else model
        except AttributeError:
            raise SpecError(
                f"es.load: the saved model has a {e['module']} at {name!r}, but this model has no module {name!r}; "
                "pass the architecture that was saved"
            ) from None
        if type(old).__name__ == e["module"]:
            continue  # already structured (part of the architecture, or loaded twice): the weights decide
        if not record.matches(old, e):
            was = f"{e['replaced']}({e['in_features']} -> {e['out_features']}, bias={e['bias']})"
            raise SpecError(
                f"es.load: module {name!r} is {record.describe(old)} in this model, but the saved model "
                f"structured a {was} there; pass the architecture that was saved"
            )
        ref = next(iter(old.parameters()))
        new = record.build(name, e, device=ref.device, dtype=ref.dtype)
        new.train(old.training)
        if not ref.requires_grad:
            new.requires_grad_(False)
        if not name:
            model = new
            continue
        parent, _, key = name.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[key] = new
    return model


def _check_tree(model: nn.Module, saved: list) -> None:
    here = _tree(model)
    for a, b in zip(saved, here):
        if list(a) != list(b):
            raise SpecError(
                f"es.load: this model differs from the saved one at module {b[0] or '<root>'!r} ({b[1]}; the saved "
                f"model has {a[0] or '<root>'!r}, {a[1]}, there); pass the architecture that was saved"
            )
    if len(saved) != len(here):
        extra = (here if len(here) > len(saved) else saved)[min(len(saved), len(here))]
        which = "this model has" if len(here) > len(saved) else "the saved model has"
        raise SpecError(
            f"es.load: {which} a module more than the other, first {extra[0]!r} ({extra[1]}); pass the "
            "architecture that was saved"
        )


def _aliases(model: nn.Module) -> dict[str, str]:
    """state_dict key -> the first key that holds the same tensor (for keys of shared tensors)."""
    first: dict[int, str] = {}
    out = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        key = id(t)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _load_state(model: nn.Module, state: dict) -> None:
    mine = model.state_dict(keep_vars=True)
    aliases = _aliases(model)
    for key in state:
        if key not in mine:
            raise SpecError(
                f"es.load: the saved weights have {key!r}, which this model does not; pass the saved architecture"
            )
        if tuple(state[key].shape) != tuple(mine[key].shape):
            raise SpecError(
                f"es.load: {key!r} has shape {tuple(state[key].shape)} in the saved weights but "
                f"{tuple(mine[key].shape)} in this model; pass the architecture that was saved"
            )
    group = {}
    for key in mine:
        if key in state:
            continue
        twins = [k for k, v in aliases.items() if v == aliases.get(key, key)] + [aliases.get(key, key)]
        source = next((k for k in twins if k in state), None)
        if source is None:
            raise SpecError(f"es.load: the saved weights have no {key!r}; pass the architecture that was saved")
        group[key] = source
    on_meta = any(t.is_meta for t in mine.values())
    if not on_meta:
        model.load_state_dict(state, strict=False)  # copies into the model's tensors: ties and devices kept
        return
    dev = next((t.device for t in mine.values() if not t.is_meta), torch.device("cpu"))
    model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=False, assign=True)
    for key, source in group.items():  # shared tensors: the same Parameter again, as before
        mod, _, leaf = key.rpartition(".")
        smod, _, sleaf = source.rpartition(".")
        holder = model.get_submodule(mod) if mod else model
        owner = model.get_submodule(smod) if smod else model
        value = owner._parameters.get(sleaf, owner._buffers.get(sleaf))
        if leaf in holder._parameters:
            holder._parameters[leaf] = value
        else:
            holder._buffers[leaf] = value
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SpecError(
            f"es.load: {left[0]!r} is still on the meta device: it is not in the saved state_dict (a non-persistent "
            "buffer); build the architecture on a real device (e.g. the CPU) instead of meta"
        )
