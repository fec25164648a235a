"""Serve's import path for the endpoint (``import_path: serve.app:build_app`` in serve/config.yaml).

The application lives in :mod:`recsys.serving.app`; the library never imports this package, whose
name would otherwise shadow ``ray.serve`` for a script run from this folder.
"""

from recsys.serving.app import AppArgs, build_app

__all__ = ["AppArgs", "build_app"]
