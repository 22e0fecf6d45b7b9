# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/neuronguard serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# CPU benchmarks on the built-in organism; each prints the ratios it measured (docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m bench.bench_engine --shape organism --probe-k 205 --threads 1
	$(BIN)/python -m bench.bench_server --threads 1
	$(BIN)/python -m bench.bench_patching
	$(BIN)/python -m bench.bench_importance
	$(BIN)/python -m bench.bench_contrasting
	$(BIN)/python -m bench.load_test
	$(BIN)/python -m bench.guard_efficacy

clean:
	rm -rf $(VENV) build *.egg-info
