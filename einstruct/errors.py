"""The project's exceptions: every user mistake surfaces as one of these."""

from __future__ import annotations


class SpecError(ValueError):
    """A structure spec, size, theta or layer argument is malformed.

    The message quotes the offending input and says how to fix it.
    """
