"""The project's exceptions: every user mistake surfaces as one of these.

    EinstructError                      the base: ``except es.EinstructError`` catches every one
    ├── SpecError (ValueError)          a spec, size, theta, preset or layer argument is malformed
    ├── MemoryLimitError (ValueError)   tensors that cannot fit in the memory of their device (or process)
    ├── MupError (ValueError)           a muP setting: param_groups' lr, weight decay, optimizer, a base or
    │                                   delta model that does not match the model, mup_init's arguments
    ├── CostTableError (ValueError)     a layout cost table (its JSON file, EINSTRUCT_COST_TABLE) is malformed
    └── search.errors.SearchError (ValueError)   a task, data file, budget or setting of the search
        ├── DataError                   a data file that is missing, too short or malformed
        └── TrainingMemoryError (also a MemoryLimitError)   a whole model too large to train on its device

Each leaf is also a ValueError, as each was before the hierarchy, so ``except ValueError`` keeps working.
Every message quotes the offending input and says how to fix it, on one line.
"""

from __future__ import annotations


class EinstructError(Exception):
    """The base of every einstruct and search error raised for a user's input or settings."""


class SpecError(EinstructError, ValueError):
    """A structure spec, size, theta or layer argument is malformed.

    The message quotes the offending input and says how to fix it. Sizes too large for any tensor (more than
    2^62 elements in a core or an activation) are a SpecError too: no device could hold them.
    """


class MemoryLimitError(EinstructError, ValueError):
    """Tensors (a layer's parameters, a forward's intermediates, a materialised matrix, a model's training
    state) need more memory than their device has, or than this process may map; refused before allocating.

    The message gives the bytes needed and available and what to make smaller.
    """


class MupError(EinstructError, ValueError):
    """A muP setting is unusable: param_groups' lr, weight_decay, optimizer or input_lr_mult, a base or delta
    model that does not match the model's modules, a model's no_weight_decay() hook, mup_init's arguments."""


class CostTableError(EinstructError, ValueError):
    """A layout cost table is unusable: its JSON file cannot be read, or a key is missing, unknown or out of
    range. The message names the file and the key, and how to write a valid one."""
