# Bootstrap and everyday commands. `make demo` and `make test` work on a fresh machine:
# each creates .venv on first use (CPU torch where no CUDA is present) and installs the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench mutation replant clean

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
	$(BIN)/python -m benchmarks.kernel_bench

# Mutation testing of the modules listed under [tool.mutmut] in pyproject.toml (slow: not in CI).
# Runs in build/mutation, a copy where decorated functions are rewritten so that mutmut mutates them
# (tests/_mutation_stage.py). One module: make mutation MUTANTS='odedit_hf.evaluation.metrics*'.
MUTANTS ?=
MUTATION_DIR := build/mutation
mutation: $(STAMP)
	$(BIN)/pip install -q -e '.[mutation]'
	$(BIN)/python tests/_mutation_stage.py $(MUTATION_DIR)
	cd $(MUTATION_DIR) && PYTHONPATH=$(CURDIR)/$(MUTATION_DIR)/kernels OMP_NUM_THREADS=1 HYPOTHESIS_PROFILE=mutation \
		$(CURDIR)/$(BIN)/mutmut run $(MUTANTS)
	cd $(MUTATION_DIR) && $(CURDIR)/$(BIN)/mutmut results

# Re-apply issue 20's nine audited bugs one at a time and check that a test catches each (~3 min; not in CI).
replant: $(STAMP)
	$(BIN)/python tests/_replant.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
