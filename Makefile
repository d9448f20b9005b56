# make test / make bench work on a fresh machine: they create .venv, install
# torch==2.13.0 (the CPU wheel) first, then the rest, build tessel._C, and run.
# make gpu-test / make gpu-bench run on the lent GPU machine with its own
# python3 (torch 2.11, triton 3.6.0 preinstalled, no network, no venv).
PY := .venv/bin/python
DEPS := .venv/.deps-stamp
BUILD := .venv/.build-stamp
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
BENCH_OUT := bench/out

.PHONY: build test bench gpu-build gpu-test gpu-bench clean

$(DEPS): requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

$(BUILD): $(DEPS) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD)

test: $(BUILD)
	$(PY) -m pytest -q

bench: $(BUILD)
	mkdir -p $(BENCH_OUT)
	$(PY) -m bench all --quick --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png

gpu-build:
	python3 -m pip install --no-build-isolation --no-deps -e .

gpu-test: gpu-build
	python3 -m pytest -q -x tests/test_attention_triton.py tests/test_linear_attention_triton.py
	python3 -m pytest -q

gpu-bench: gpu-build
	python3 -m bench all --device cuda --json "bench/results/{device}-all-{date}.json" \
		--plot bench/results/cuda-all.png

clean:
	rm -rf build *.egg-info pymod/_C*.so $(BUILD)
