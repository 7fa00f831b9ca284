# thrifty: `make serve` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.thrifty-installed
MODELS ?= qwen2.5-coder-0.5b-instruct gemma-3-270m all-minilm-l6-v2

.PHONY: install test test-fast serve clean

install: $(STAMP)
	@$(VENV)/bin/thrifty models pull $(MODELS)

# Reinstall only when the package definition changes; the model pull above is a no-op when present.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real"

serve: install
	$(VENV)/bin/thrifty serve

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
