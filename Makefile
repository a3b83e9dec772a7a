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

.PHONY: demo test setup lint bench clean gpt

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,examples]"
	touch $@

setup: $(VENV)/.installed

# The digits example reads sharded Arrow datasets made from scikit-learn's bundled digits.
DIGITS := data/digits-train/manifest.json data/digits-eval/manifest.json
data/digits-%/manifest.json: $(VENV)/.installed examples/digits/data.py
	$(VENV)/bin/trainctl data shard examples.digits.data:digits_$* --out data/digits-$* --overwrite

demo: setup $(DIGITS)
	$(VENV)/bin/trainctl run examples/digits/ddp.yaml

# The GPT example (any strategy): make gpt STRATEGY=ddp|fsdp
STRATEGY ?= fsdp
data/gpt-train/manifest.json: $(VENV)/.installed examples/gpt/data.py
	$(VENV)/bin/trainctl data shard examples.gpt.data:gpt_train --out data/gpt-train --overwrite

gpt: setup data/gpt-train/manifest.json
	$(VENV)/bin/trainctl run examples/gpt/$(STRATEGY).yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data_loader.py
	$(PY) benchmarks/strategies.py

clean:
	rm -rf $(VENV) runs .pytest_cache
