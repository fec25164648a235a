"""Offline evaluation: full-ranking metrics, reports, and scoring exported models on a split.

Import from the submodules (no re-exports here, so each name has one import path):
``metrics`` turns scores into ranks and ranks into metrics (one path for validation and test);
``schema`` holds the report models (``report.json``); ``report`` builds, saves and renders them;
``figures`` draws them (matplotlib is imported only when a figure is drawn); ``ranking`` and
``offline`` score exported models on a split.
"""
