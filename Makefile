# Two entry points: `make demo` and `make test`. Each creates .venv and installs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# transformers' own GGUF loader, which one test holds the importer to, needs torch: kept out of the venv,
# because transformers imports torch in every process that can find it (2 s each, in every conch process)
REFERENCE := $(VENV)/reference

.PHONY: demo test lint docs mutate clean system-packages

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps --target $(REFERENCE) torch==2.13.0 'accelerate>=1.0' sympy mpmath networkx
	touch $@

# As root on Debian (as in CI) the system packages are installed here: OpenBLAS, which conch puts in
# front of MLX's slow reference BLAS on Linux, and Chromium, in which the report's test draws the page.
# Elsewhere conch runs without them (slower, and the browser test is skipped unless CI is set).
system-packages:
	@missing=""; \
	  [ "$$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas && missing="libopenblas0-pthread"; \
	  [ "$(WITH_CHROMIUM)" = 1 ] && ! command -v chromium >/dev/null 2>&1 && missing="$$missing chromium"; \
	  [ -z "$$missing" ] && exit 0; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	    echo "make: could not install$$missing"; \
	  else echo "make: not installed:$$missing (install them for a fast MLX on Linux and the browser test)"; fi

demo: $(VENV)/.installed system-packages
	$(VENV)/bin/conch demo

# two workers (the tests are independent; those on the real pair share one, see tests/conftest.py)
test: $(VENV)/.installed
	@$(MAKE) --no-print-directory system-packages WITH_CHROMIUM=1
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# docs/config.md and docs/cli.md, made from the code (tests/test_docs.py fails when they are stale)
docs: $(VENV)/.installed
	$(PY) -m conch_dna.cli.reference

# Mutation testing (mutmut) of the gate, the losses, evaluation and ingest; the survivors are listed at the end.
mutate: $(VENV)/.installed
	$(PY) -m pip install -q 'mutmut>=3.3'
	cd $(CURDIR) && $(VENV)/bin/mutmut run; $(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) demo-home mutants
