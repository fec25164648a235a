"""The Ray Serve app (``serve.app:build_app``) and its config; a regular package, so that
``import serve`` never resolves to another module named ``serve`` on the path (bench/serve.py)."""
