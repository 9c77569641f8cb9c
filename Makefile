# Two commands on a fresh machine: `make run` and `make test`.
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
STAMP := $(VENV)/.synced

.PHONY: run test test-fast lint bench env clean

$(UV):
	python3 -m pip install --user --quiet "uv>=0.5"

# The locked environment: created or updated from uv.lock, never re-resolved.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tlpipe run

# Then the publish and registry tests again, on the embedded store run as a cluster (a
# master, 2 volume servers, a filer and an S3 gateway: tlpipe.cluster).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
	TLPIPE_STORE_VOLUMES=2 $(VENV)/bin/python -m pytest -q tests/test_publish.py tests/test_registry.py \
		-k "not volume_server_killed"

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

# bench/results.json and docs/benchmarks.md; runs the pipeline first if anything is stale.
# About 75 minutes on 2 cores. TLPIPE_BENCH_THREADS pins the thread count (default: all cores).
bench: $(STAMP)
	$(VENV)/bin/tlpipe run
	TLPIPE_PROGRESS=0 $(VENV)/bin/python -m bench.train
	$(VENV)/bin/python -m bench.infer
	$(VENV)/bin/python -m bench.predict
	$(VENV)/bin/python -m bench.serving
	$(VENV)/bin/python -m bench.validate
	TLPIPE_PROGRESS=0 $(VENV)/bin/python -m bench.image --efficientnet
	TLPIPE_PROGRESS=0 $(VENV)/bin/python -m bench.generation
	$(VENV)/bin/python -m bench.pipeline
	$(VENV)/bin/python -m bench.runners
	$(VENV)/bin/python -m bench.report

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs .tlpipe
