VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# torch is not in requirements.lock: its build (CPU here, a CUDA one on GPU nodes) is chosen per
# machine; every install names this version, and the lock is resolved against it.
TORCH := torch==2.13.0
LOCK_TOOLS ?= build/lock-tools
LOCK_ARGS ?=

.PHONY: venv test demo cluster-demo lock clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch named in both installs: a fresh resolve of the project otherwise swapped the CPU build
# (seconds, from local disk) for a CUDA one (GBs, 30 min on a slow link). Everything else comes
# at the versions requirements.lock pins.
$(VENV)/.installed: $(PY) pyproject.toml requirements.lock
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.lock -e ".[test]" $(TORCH)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	bash scripts/demo.sh

# 3 Ray nodes, S3 (moto) and an MLflow server on 127.0.0.1; an elastic run loses a node (docs/cluster.md)
cluster-demo: venv
	$(PY) -m cluster.simulate

# Rewrite requirements.lock from pyproject.toml (project and test dependencies) with pip-tools,
# installed in a throwaway venv, not the project's. Existing pins are kept unless
# LOCK_ARGS="--upgrade" (everything) or LOCK_ARGS="--upgrade-package ray" (one package).
# Resolved for Linux, Python 3.11 (CI and the cluster image), against torch's CPU build.
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || (python3 -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install --quiet pip-tools==7.7.0)
	echo "$(TORCH)" > $(LOCK_TOOLS)/torch.txt
	$(LOCK_TOOLS)/bin/pip-compile --quiet --extra test --strip-extras --unsafe-package torch \
		--constraint $(LOCK_TOOLS)/torch.txt --no-emit-find-links --no-emit-index-url \
		--no-emit-trusted-host $(LOCK_ARGS) --output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
