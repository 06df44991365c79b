# fastmaya: `make install`, `make test`, `make demo`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= 2.13.0

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

# torch first: with CUDA present the default (CUDA) build, otherwise the CPU build of $(TORCH),
# taken from a local wheel where pip is configured with one, else from PyTorch's CPU index.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.4"; \
	else \
		$(PY) -m pip install -q "torch==$(TORCH)+cpu" 2>/dev/null || \
		$(PY) -m pip install -q "torch==$(TORCH)+cpu" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

demo: install
	mkdir -p out
	$(VENV)/bin/fastmaya render samples/demo.txt --voice @narrator -o out/demo.m4b --manifest out/demo.json

bench: install
	$(VENV)/bin/fastmaya bench --json out/bench.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
