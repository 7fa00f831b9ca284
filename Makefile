# thrifty: `make serve` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.thrifty-installed
MODELS ?= qwen2.5-coder-0.5b-instruct all-minilm-l6-v2
# Pulled by `make test` (its tests compare Gemma 3 with transformers); it serves too (`--model gemma-3-270m`),
# but `make install` leaves it out: the default server runs the Qwen coder.
TEST_MODELS ?= gemma-3-270m

.PHONY: install browser test test-fast serve clean

install: $(STAMP)
	@$(VENV)/bin/thrifty models pull $(MODELS)

# Reinstall only when the package definition changes; the model pull above is a no-op when present.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

# The dashboard test drives Debian's chromium headless through its chromedriver (no browser download); a fresh
# machine (CI) gets them here. apt needs root: otherwise say what to run.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "make test: the dashboard test needs chromium and chromedriver; run as root or: sudo apt-get install -y chromium chromium-driver" >&2; \
	    exit 1; \
	  fi; \
	fi

test: install browser
	@$(VENV)/bin/thrifty models pull $(TEST_MODELS)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real"

# `make serve HOST=0.0.0.0 PORT=8080 CONFIG=thrifty.yaml`: each optional
serve: install
	$(VENV)/bin/thrifty serve $(if $(CONFIG),--config $(CONFIG)) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
