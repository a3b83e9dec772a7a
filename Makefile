# Two entry points for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch (a GPU machine installs its CUDA build with plain `pip install -e .`).
TORCH  ?= torch==2.13.0

# Keep every Ray node, the GCS and the drivers on 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
# Let Python cache the bytecode it compiles (torch, Ray: the .venv is ours). Where the shell sets
# PYTHONDONTWRITEBYTECODE=1, every process that imports torch compiled it again: 7.9 CPU-s
# instead of 2.6, in each of the suite's hundreds of processes (its CPU time doubled).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test setup lint bench clean gpt gpt-compress prometheus postgresql dashboards gpu-smoke

# What `make demo` needs and nothing more (a first run within two minutes): trainctl with torch
# and Ray, scikit-learn's digits and torch-pruning (the demo's post-training passes: structured
# pruning, then torch's own dynamic int8), in one resolver pass. --no-compile: pip would spend
# about a minute byte-compiling all 14,000 files of torch, Ray and the rest; Python compiles
# (and caches) only the ones the demo imports, as it imports them: a few seconds of its first run.
$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --no-compile "$(TORCH)" -e ".[demo]"
	touch $@

# Everything the tests use: DeepSpeed, Horovod (built once per torch version, the wheel is
# cached), MLflow, Optuna, the test tools.
$(VENV)/.installed: $(VENV)/.demo
	bash cluster/deploy/build_horovod.sh $(PY)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)" -e ".[dev,examples,compress,deepspeed,horovod]"
	touch $@

setup: $(VENV)/.installed prometheus postgresql

# The real Prometheus that tests/cluster/test_metrics_prometheus.py scrapes with (Debian's package;
# where it cannot be installed that test is skipped, saying why).
prometheus:
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }; }; } || \
	  echo "note: no prometheus binary (apt-get install prometheus); the real-Prometheus test will be skipped"

# The real PostgreSQL server the job-store and head-restart tests start on 127.0.0.1 (Debian's
# package; the tests run initdb/pg_ctl themselves and skip, saying why, where it is missing).
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }; }; } || \
	  echo "note: no PostgreSQL server (apt-get install postgresql); the PostgreSQL store tests will be skipped"

# Grafana dashboards and the scrape config in cluster/monitoring/, from orchestrator/monitoring/metrics.py
dashboards: $(VENV)/.installed
	$(PY) -m orchestrator.monitoring.dashboards

# The digits example reads sharded Arrow datasets made from scikit-learn's bundled digits:
# both splits in one interpreter (`trainctl data shard` twice, without a second start-up).
DIGITS := data/digits-train/manifest.json data/digits-eval/manifest.json
$(DIGITS): $(VENV)/.demo examples/digits/data.py
	$(PY) -m examples.digits.data data

# The digits example for 6 of its 15 epochs (held-out accuracy ~0.97 by then, as at 15).
demo: $(VENV)/.demo $(DIGITS)
	$(VENV)/bin/trainctl run examples/digits/ddp.yaml --set config.epochs=6

# The GPT example (any strategy): make gpt STRATEGY=ddp|fsdp|tensor|pipeline|hybrid|...
STRATEGY ?= fsdp
data/gpt-train/manifest.json: $(VENV)/.installed examples/gpt/data.py
	$(VENV)/bin/trainctl data shard examples.gpt.data:gpt_train --out data/gpt-train --overwrite

gpt: setup data/gpt-train/manifest.json
	$(VENV)/bin/trainctl run examples/gpt/$(STRATEGY).yaml

# The GPT example trained, then pruned and quantized after training (post_training)
data/gpt-eval/manifest.json: $(VENV)/.installed examples/gpt/data.py
	$(VENV)/bin/trainctl data shard examples.gpt.data:gpt_eval --out data/gpt-eval --overwrite

gpt-compress: setup data/gpt-train/manifest.json data/gpt-eval/manifest.json
	$(VENV)/bin/trainctl run examples/gpt/compress.yaml

# The suite in TEST_WORKERS processes (pytest-xdist), a test module per process at a time, so
# that its tests share the module's cluster. Most of a cluster test's time is waiting (on Ray
# starting, on steps, on a head coming back): 3 processes on 2 cores took 19 min against 33.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# On a GPU machine (no network needed: what `make setup` installed plus a CUDA build of torch):
# CUDA/nccl preflight, every strategy on the GPU, the examples as GPU jobs, GPU metrics, the
# GPT example's throughput and MFU against a bare loop; most important first, stops at the first
# failure, and the whole run is bounded (GPU_SMOKE_TIMEOUT seconds).
GPU_SMOKE_TIMEOUT ?= 480
gpu-smoke:
	timeout -s INT -k 30 $(GPU_SMOKE_TIMEOUT) $(PY) -m pytest -m gpu tests/gpu -x -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup $(DIGITS)
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/strategies.py
	$(PY) benchmarks/metrics_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
