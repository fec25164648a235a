"""Serving: a pure predictor over a model export (no Ray), its user-history store and the
request/response schemas shared by the Ray Serve app in ``serve/`` and the tests."""
