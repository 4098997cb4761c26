# fedct: `make demo` runs the main job, `make test` the tests (CI), `make check` the fast
# loop for contributors; all create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch: CI's pip finds the CPU wheel on disk (find-links); on PyPI alone pip takes the CUDA
# build, so elsewhere add --index-url https://download.pytorch.org/whl/cpu for the CPU one.
# On a GPU node: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
UV_SPEC ?= uv==$(shell sed -n 's/^uv==//p' requirements.lock)
# Every other package is pinned here (uv pip compile; `make lock` refreshes it). Torch is
# left out of the lock so that the CPU and CUDA builds of the same version both fit it.
LOCK := requirements.lock
# glibc returns every tensor over 32 MB to the OS and faults it back in: keeping the
# memory mapped makes CPU training and batched MC dropout ~1.3x faster (benchmarks/).
DEMO_ENV ?= MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736

.PHONY: demo seeds study test check venv lint bench clean-demo lock mlflow-server
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_SPEC)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	# uv installs the fully pinned lock (no resolution: --no-deps) about 10x faster than
	# pip; pip keeps torch, whose CPU wheel only pip finds on disk; pip check verifies.
	# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE
	# is set (CI images, containers) every process would compile mlflow, pandas, ray, ...
	# from source again (import mlflow: 3.6 -> 1.3 CPU-s, pandas 1.3 -> 0.35).
	$(BIN)/python -m pip install --quiet $(UV_SPEC)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# Re-resolve every pin from pyproject.toml's ranges in one step (after editing them).
# Linux x86_64, CPython 3.11; torch is pinned by TORCH_SPEC instead (see above). The CPU
# wheel of torch must be in TORCH_WHEELS, so that its (CUDA-free) dependencies are locked.
TORCH_WHEELS ?= /opt/wheels
lock:
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	echo "torch==2.13.0+cpu" > $(VENV)/torch-override.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
	  --override $(VENV)/torch-override.txt --no-emit-package torch \
	  --custom-compile-command "make lock" -o $(LOCK)

# Main job: `dvc repro` from the synthetic archive (the synth stage) to the registry and
# the report, every stage logged to MLflow.
demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_ENV) $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show
	@echo "Results travel with git: commit the lock and results/ (docs/pipeline.md, Sharing results):"
	@echo "  git add dvc.lock results && git commit -m 'demo results'"

# The study over report seeds (params: synth.report_seeds, cohort.report_seeds): one
# `dvc exp run --temp` per seed pair up to evaluate, then outputs/seeds/ (docs/pipeline.md).
seeds: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_ENV) $(BIN)/fedct seeds

# The study of issue 23 (docs/study.md): profiles/study.yaml over params.yaml, one `dvc exp
# run --temp` per (report seed pair, training seed); each finished run is one row of
# results/study/runs.csv (commit it), and a rerun resumes where the last one stopped.
study: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_ENV) $(BIN)/fedct study

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The fast loop: lint, then every test but the slow ones (`-m slow`: those that run dvc, the
# CLI or training processes end to end; `make test` runs them). One torch thread per
# worker: two workers with two threads each would oversubscribe two cores.
check: venv
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/catalogue.py
	$(BIN)/python benchmarks/fixed_cost.py
	$(BIN)/python benchmarks/mc_dropout.py
	$(DEMO_ENV) $(BIN)/python benchmarks/mc_dropout.py

# DVC's cache goes too: with it `dvc repro` would check every stage's outputs out of the
# cache without running it ("is cached - skipping run"), and the new MLflow store would get
# no run. Afterwards the repository is as a fresh clone.
clean-demo:
	rm -rf data outputs mlruns mlflow.db .dvc/cache

# A shared MLflow server: PostgreSQL backend store (database created if missing), artifacts
# in MLFLOW_ARTIFACTS, on loopback until Ctrl-C (which stops it by its PID). Clients:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
MLFLOW_PG ?= postgresql+psycopg2://postgres@127.0.0.1:5432
MLFLOW_DB ?= fedct_mlflow
MLFLOW_PORT ?= 5000
MLFLOW_ARTIFACTS ?= mlartifacts
mlflow-server: venv
	$(BIN)/python -m fedct.mlflow_server --pg $(MLFLOW_PG) --database $(MLFLOW_DB) \
	  --artifacts $(MLFLOW_ARTIFACTS) --port $(MLFLOW_PORT)
