# The README's two commands: `make demo` and `make test`. Each installs what is missing first.
PYTHON ?= python3

.PHONY: setup demo test precompile

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -c "import einops, safetensors, pytest, transformers, moe_fp8" 2>/dev/null \
	  || $(PYTHON) -m pip install -q -e ".[test]"

demo: setup
	$(PYTHON) examples/deepseek_v3_moe.py

test: setup
	$(PYTHON) -m pytest -q tests

precompile: setup
	$(PYTHON) -m moe_fp8.gemm.precompile
