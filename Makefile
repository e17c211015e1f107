# Two commands on a fresh machine (see README):  `make run`  and  `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.rklu-installed
PYTEST_ARGS ?=
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: install run test bench-cpu clean

# Some machines export PYTHONDONTWRITEBYTECODE=1 (and pip runs --no-compile): every Python process then compiles
# torch and transformers from source again, ≈ 13 s each (the test run's subprocesses and DDP ranks included).
# The caches land in .venv and in git-ignored __pycache__ folders.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --no-compile -q -r requirements.txt 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . > $(VENV)/build.log 2>&1 || (tail -60 $(VENV)/build.log; exit 1)
	@echo "build log (with the CUDA kernels' ptxas register/spill report, if any were compiled): $(VENV)/build.log"
	$(PY) -c "import rklu_fast, json; print('rklu_fast backends:', json.dumps(rklu_fast.backends()))"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/rklu run --config configs/tiny-tofu.yaml

# ruff (rules in pyproject.toml), then the wheel check (a wheel installed into a fresh venv and run from outside the
# repository: .ci/wheel_check.sh), then pytest, whose summary stays the last line.
test: install
	$(VENV)/bin/ruff check .
	bash .ci/wheel_check.sh $(PY)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-cpu: install
	$(PY) benchmarks/bench_loss.py --device cpu

clean:
	rm -rf build *.egg-info rklu_fast/*.so
