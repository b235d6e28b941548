# The two commands of a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --disable-pip-version-check -q -e '.[test]'

demo: install
	$(PYTHON) -m lorabus.worker.cli demo

test: install
	$(PYTHON) -m pytest -q -ra --durations=10
