# Two entry points: `make demo` and `make test`. Each creates .venv and installs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch is on disk; install it first so the package's torch range is met.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dsinfer.tools.demo --workdir demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/reshard_cpu.py

clean:
	rm -rf $(VENV) demo-out build *.egg-info

# docs/cli.md and docs/architectures.md from the code; notebooks executed and saved with outputs.
.PHONY: docs notebooks
docs: $(STAMP)
	$(BIN)/python -m dsinfer.tools.gen_docs

notebooks: $(STAMP)
	$(BIN)/python -m dsinfer.tools.gen_docs --notebooks
