# The two set-up commands of README.md. Both install into the current Python environment.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo

EXTRAS ?= dev

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@# Pin whatever torch is installed (CPU or CUDA build) so pip never swaps it for another build.
	@$(PYTHON) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .torch-constraint.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check -c .torch-constraint.txt -e ".[$(EXTRAS)]"

test: install
	$(PYTHON) -m pytest tests

demo: EXTRAS = train,eval
demo: install
	$(PYTHON) examples/demo.py
