# The two commands of the README:  `make demo`  and  `make test`.  Both set everything up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data
RUNS   ?= runs
export VENV DATA

.PHONY: setup demo test bench clean-runs
setup:
	@bash scripts/setup.sh

# Main job: Fashion-MNIST betons -> CLAMP pretraining of a narrow ResNet-18 on the CPU -> kNN of
# random init vs pretrained. Under 15 minutes on 2 cores. The flags live in scripts/demo.sh.
demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/loader.py
	$(PY) bench/losses.py --quick

clean-runs:
	rm -rf $(RUNS)/demo
