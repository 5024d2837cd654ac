# Bootstrap and everyday commands. `make demo` and `make test` work on a fresh machine:
# each creates .venv on first use (CPU torch where no CUDA is present) and installs the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(PY) $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/odedit-hf demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src kernels tests benchmarks
	$(BIN)/ruff format --check src kernels tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.kernels

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
