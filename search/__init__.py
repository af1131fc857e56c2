"""The structure-search engine: tasks, budgeted training, the Optuna loop, frontiers and reports.

It imports einstruct; einstruct never imports it.
"""
