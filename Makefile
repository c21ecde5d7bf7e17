# One environment, created on first use. LSDC_VENV moves it (CI keeps one across clones).
LSDC_VENV ?= .venv
PY := $(LSDC_VENV)/bin/python
DEPS_STAMP := $(LSDC_VENV)/.lsdc-deps-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
DEMO_DIR ?= demo-output

export HF_HUB_OFFLINE := 1

.PHONY: setup test lint demo bench clean wheelhouse

$(PY):
	python3 -m venv $(LSDC_VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies are pinned by constraints.txt (torch 2.14.1 with torchvision 0.29.1); reinstalled
# only when pyproject.toml or constraints.txt change. The optional dask group is in, so the
# tests of the Dask executor run.
$(DEPS_STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -c constraints.txt -e ".[dev,dask]"
	rm -f $(LSDC_VENV)/.lsdc-deps-* && touch $@

# The editable install is re-pointed at this checkout every time (cheap), so one shared
# environment serves any clone.
setup: $(DEPS_STAMP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

lint: setup
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src tests bench scripts

test: lint
	$(PY) -m pytest -n 2 --durations=15

demo: setup
	$(LSDC_VENV)/bin/lsdc demo $(DEMO_DIR)

# Everything an offline machine needs to `pip install --no-index --find-links wheelhouse lsdc`:
# the lsdc wheel and every dependency at the pinned versions (docs/offline.md).
wheelhouse: setup
	rm -rf wheelhouse && mkdir wheelhouse
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w wheelhouse .
	$(PY) -m pip download -q -c constraints.txt -d wheelhouse wheelhouse/lsdc-*.whl

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
