"""The structure-search engine: tasks, budgeted training, the Optuna loop, frontiers and reports.

It imports einstruct; einstruct never imports it.
"""


def __getattr__(name):
    if name == "run_search":  # lazily, so that `from search import tasks, train` does not import Optuna
        from .loop import run_search

        return run_search
    raise AttributeError(f"module 'search' has no attribute {name!r}")
