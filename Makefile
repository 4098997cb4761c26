# fedct: `make demo` runs the main job, `make test` the tests; both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch (CI, laptops). On a GPU node: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= demo
# glibc returns every tensor over 32 MB to the OS and faults it back in: keeping the
# memory mapped makes CPU training and batched MC dropout ~1.3x faster (benchmarks/).
DEMO_ENV ?= MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736

.PHONY: demo test venv lint bench clean-demo
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Main job: synthetic archive (if absent) -> full `dvc repro` -> results in MLflow.
demo: venv
	test -d data/archive || $(BIN)/fedct synth data/archive --truth data/truth --labels data/labels --profile $(PROFILE)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_ENV) $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/catalogue.py
	$(BIN)/python benchmarks/mc_dropout.py
	$(DEMO_ENV) $(BIN)/python benchmarks/mc_dropout.py

clean-demo:
	rm -rf data outputs mlruns mlflow.db
