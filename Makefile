VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test demo cluster-demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch named in both installs: a fresh resolve of the project otherwise swapped the CPU build
# (seconds, from local disk) for a CUDA one (GBs, 30 min on a slow link).
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]" torch==2.13.0
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	bash scripts/demo.sh

# 3 Ray nodes, S3 (moto) and an MLflow server on 127.0.0.1; an elastic run loses a node (docs/cluster.md)
cluster-demo: venv
	$(PY) -m cluster.simulate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
