"""Serve's import path (``serve.app:build_app``; the app itself is ``recsys.serving.app``) and
its config; a regular package, so that ``import serve`` never resolves to another module named
``serve`` on the path (bench/serve.py)."""
