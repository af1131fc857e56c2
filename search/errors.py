"""Errors of the search engine: bad settings or data, each with a message that says how to fix it."""

from __future__ import annotations


class SearchError(ValueError):
    """A task, data file, budget or setting is unusable; the message names the problem and the fix."""


class DataError(SearchError):
    """A data path is missing, empty, too short for one batch, or in the wrong format."""
