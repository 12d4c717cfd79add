# The README's two commands. Each runs the idempotent set-up first.
#   make demo   convert Fashion-MNIST, pretrain SimCLR, linear evaluation, plots (CPU or GPU)
#   make test   the whole test suite, one pytest-xdist worker per core (at most 8)
# and `make test-fast`, the inner loop: the tests not marked slow (no training subprocess, no FFCV
# compilation, no multi-process run), in about a minute on 2 cores.
# and, on a GPU machine, `make gpu-check ARGS="--data DIR --images DIR"` (no set-up: it runs on
# whatever python3 has torch when there is no .venv)
PY := .venv/bin/python
CHECK_PY := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
DEMO_CONFIG ?= train/configs/fashion_mnist_demo.yaml
DEMO_DATA := data/fashion-mnist
DEMO_RUN := runs/fashion-mnist-demo
# accelerate gives a CPU-only process one thread unless told otherwise
ACCELERATE := .venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(shell nproc)

# loadscope: each test module runs whole on one worker, so its module-scoped fixtures (compiled
# FFCV loaders, reference runs) are built once; fixtures shared across modules are built once per
# run (tests/fashion_mnist.py: build_once)
PYTEST := $(PY) -m pytest -n auto --maxprocesses 8 --dist loadscope

.PHONY: setup demo test test-fast gpu-check lint bench-peers clean-demo

setup:
	@bash tools/setup.sh

demo: setup
	@$(PY) -c "from pipelines.sources import open_dataset as o; o('$(DEMO_DATA)').beton('train')" 2>/dev/null || \
		$(PY) -m tools.convert "$$(cat data/.fashion-mnist-path)" $(DEMO_DATA) --to ffcv --overwrite
	$(ACCELERATE) -m train.pretrain --config $(DEMO_CONFIG) --train.out_dir=$(DEMO_RUN) --resume auto $(ARGS)
	$(PY) -m train.linear_eval --checkpoint $(DEMO_RUN)
	$(PY) -m tools.plot $(DEMO_RUN)

test: setup
	$(PYTEST) -q

test-fast: setup
	$(PYTEST) -q -m "not slow"

gpu-check:
	$(CHECK_PY) -m tools.gpu_check $(ARGS)

bench-peers: setup
	$(PY) -m pip install -q --no-deps -r requirements-bench.txt

lint: setup
	.venv/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_RUN)
