# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch to install; on CPU-only machines use TORCH_SPEC=torch==2.13.0.
TORCH_SPEC ?= torch
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-ddp bench bench-small lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) examples/demo_kill_resume.py

demo-ddp: $(STAMP)
	$(PY) examples/demo_ddp.py

bench: $(STAMP)
	$(PY) benchmarks/bench_save_restore.py --out BENCHMARKS.results.json
	$(PY) benchmarks/bench_training_loop.py --out BENCHMARKS.loop.json
	$(PY) benchmarks/bench_run_length.py --out BENCHMARKS.runlength.json
	$(PY) benchmarks/bench_incremental.py --out BENCHMARKS.incremental.json
	$(PY) benchmarks/bench_fsdp.py --out BENCHMARKS.fsdp.json
	$(PY) benchmarks/bench_s3.py --out BENCHMARKS.s3.json
	$(PY) benchmarks/bench_zstd.py --out BENCHMARKS.zstd.json

bench-small: $(STAMP)
	$(PY) benchmarks/bench_save_restore.py --small
	$(PY) benchmarks/bench_training_loop.py --small
	$(PY) benchmarks/bench_run_length.py --small
	$(PY) benchmarks/bench_incremental.py --small
	$(PY) benchmarks/bench_fsdp.py --small
	$(PY) benchmarks/bench_s3.py --small
	$(PY) benchmarks/bench_zstd.py --small

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
