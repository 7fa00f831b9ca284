# thrifty: `make serve` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.thrifty-installed
MODELS ?= qwen2.5-coder-0.5b-instruct all-minilm-l6-v2
# Pulled by `make test` (its tests compare Gemma 3 with transformers); it serves too (`--model gemma-3-270m`),
# but `make install` leaves it out: the default server runs the Qwen coder.
TEST_MODELS ?= gemma-3-270m

.PHONY: install browser test test-fast serve llama-server clean

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

# llama.cpp's C++ server, a peer of `thrifty bench serve --serve llama-server` (not needed by `make test`): built
# with cmake from the llama.cpp source that llama-cpp-python's pinned sdist vendors, into the venv's bin/, where the
# bench finds it (or set THRIFTY_LLAMA_SERVER). About 8 minutes on 2 cores.
LLAMA_CPP_SDIST ?= llama-cpp-python==0.3.36
LLAMA_BUILD     := build/llama-cpp
llama-server: $(VENV)/bin/llama-server

$(VENV)/bin/llama-server: $(STAMP)
	rm -rf $(LLAMA_BUILD) && mkdir -p $(LLAMA_BUILD)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: '$(LLAMA_CPP_SDIST)' -d $(LLAMA_BUILD)
	tar -xzf $(LLAMA_BUILD)/llama_cpp_python-*.tar.gz -C $(LLAMA_BUILD)
	cmake -S $(LLAMA_BUILD)/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_BUILD)/out -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMA_BUILD)/out --target llama-server -j$(or $(JOBS),2)
	cp $(LLAMA_BUILD)/out/bin/llama-server $@

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
