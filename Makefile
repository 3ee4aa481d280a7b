# The README's two commands:  `make demo` (install, data, pretrain, evaluate, index)  and  `make test`.
# Both create ./.venv themselves and work on a fresh Debian/Ubuntu machine with Python 3.10+ and apt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    := runs/pets09_r18
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests read: Chromium for the browser tests, Fashion-MNIST for the classification protocols.
TEST_APT := chromium chromium-driver dataset-fashion-mnist

.PHONY: demo test install install-test apt-test data app lint clean-runs

# A new .venv holds ~6.8 GB (torch's CUDA build and its nvidia-* wheels, which also run on the CPU) and pip
# needs room for the downloads besides: stop before pip fills the disk halfway. MIN_FREE_GB=0 skips the check.
MIN_FREE_GB ?= 8

$(BIN)/python:
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(MIN_FREE_GB) else f'make: {free:.1f} GB free on this disk; a new $(VENV) (torch, CUDA wheels, ' \
	'test tools) needs about $(MIN_FREE_GB) GB. Free some space, or run with MIN_FREE_GB=0 to try anyway.')"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'

apt-test:
	@missing=$$(for p in $(TEST_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$missing >/dev/null; \
	fi

# Real pedestrian crops: vtest.avi from Debian's opencv-doc package, cropped with the committed tracks.
data: install
	$(BIN)/reid_ssl prepare pets09 --fetch

# (1) The main job: ~8 min on 2 CPU cores from a fresh clone (pip cache warm), install included (bench_demo).
demo: data
	$(BIN)/reid_ssl train
	$(BIN)/reid_ssl eval --checkpoint $(RUN)/checkpoint.pt --dataset pets09
	$(BIN)/reid_ssl index build --checkpoint $(RUN)/checkpoint.pt --images pets09 --out $(RUN)/gallery
	@echo "checkpoint: $(RUN)/checkpoint.pt   browse the gallery:  $(BIN)/reid_ssl app"

# (2) The tests (CI runs exactly this): lint (ruff, ruff format, mypy), then pytest.
test: install-test apt-test data lint
	$(BIN)/python -m pytest

app:
	$(BIN)/reid_ssl app

lint: install-test
	$(BIN)/ruff check reid_ssl app tests benchmarks datasets
	$(BIN)/ruff format --check reid_ssl app tests benchmarks datasets
	$(BIN)/mypy reid_ssl

clean-runs:
	rm -rf runs
