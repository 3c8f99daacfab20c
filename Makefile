# `make quickstart` and `make test` each create the virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: quickstart test benchmark clean-venv

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# Pre-train on the embedded CIFAR-10 subset, then kNN + linear probe against baselines (README command 1).
quickstart: $(STAMP)
	$(PY) -m ssl_jax.quickstart --workdir=workdirs/quickstart

# The whole test suite on 8 simulated CPU devices (README command 2; what CI runs). SSL_JAX_HUGE_PAGES=0: the
# entry points the tests start do not restart themselves (ssl_jax/host_memory.py; tested on its own).
test: $(STAMP)
	SSL_JAX_HUGE_PAGES=0 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

benchmark: $(STAMP)
	$(PY) benchmarks/simclr_step.py

clean-venv:
	rm -rf $(VENV)
