# perception2d — pip-only setup (no ROS install, no GPU needed).
#   make demo   create .venv with the runtime only (ROS 2 Kilted wheels, ONNX Runtime, OpenCV, ...;
#               no torch), build messages, run the main job on the embedded default data
#   make test   the same plus the test and export extras (pytest, torch, reference packages), run tests
#   make setup-runtime / make setup   only the set-up of demo / test
# Re-running is fast: each step is stamped and only redone when its inputs change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BAG ?=
STAMPS := $(VENV)/.stamps
# hides one harmless pip line; braces keep pip's exit status (set -o pipefail) so a failed
# install stops make instead of being swallowed by `|| true`
PIP_FILTER := { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

.PHONY: all setup setup-runtime test demo msgs clean bench lint

all: setup

setup: $(STAMPS)/package $(STAMPS)/test-deps

setup-runtime: $(STAMPS)/package

$(STAMPS)/venv:
	@echo "==> [1/4] creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/deps: $(STAMPS)/venv requirements/runtime.txt requirements/build.txt
	@echo "==> [2/4] installing ROS 2 Kilted wheels, runtime and message-build dependencies (first run: a few minutes)"
	@set -o pipefail; $(PIP) install --progress-bar off -r requirements/runtime.txt -r requirements/build.txt 2>&1 | $(PIP_FILTER)
	@touch $@

# Test and export extras (torch, reference packages, pytest): `make test` only, not `make demo`.
$(STAMPS)/test-deps: $(STAMPS)/deps requirements/test.txt requirements/torch.txt requirements/nodeps.txt
	@echo "==> [+] installing test and export extras: pytest, torch (CPU use; a few GB), reference packages"
	@set -o pipefail; $(PIP) install --progress-bar off -r requirements/test.txt 2>&1 | $(PIP_FILTER)
	@set -o pipefail; $(PIP) install --progress-bar off --no-deps --no-build-isolation -r requirements/nodeps.txt 2>&1 | $(PIP_FILTER)
	@touch $@

$(STAMPS)/msgs: $(STAMPS)/deps $(wildcard interfaces/*/msg/*.msg interfaces/*/CMakeLists.txt) scripts/build_interfaces.sh
	@echo "==> [3/4] building interface packages (vision_msgs where absent, perception2d_interfaces)"
	bash scripts/build_interfaces.sh $(VENV)
	@touch $@

$(STAMPS)/package: $(STAMPS)/msgs setup.py
	@echo "==> [4/4] installing perception2d (editable)"
	@set -o pipefail; $(PIP) install --progress-bar off --no-deps --no-build-isolation --use-pep517 -e . 2>&1 | $(PIP_FILTER)
	@touch $@

msgs: $(STAMPS)/msgs

# Test tooling, not a dependency: the real ROS 2 launch stack (launch_ros, ros2cli) for the
# real-launch tests, from ../shared/ros2-launch when it exists (else those tests skip, saying
# why). install.sh keeps a stamp in the venv: a re-run only checks it (about 1 s).
LAUNCH_STACK ?= ../shared/ros2-launch

test: setup
	@if [ -f "$(LAUNCH_STACK)/install.sh" ]; then \
	  echo "==> ROS 2 launch stack from $(LAUNCH_STACK) (test tooling; first run about 30 s)"; \
	  bash "$(LAUNCH_STACK)/install.sh" $(VENV); \
	fi
	bash scripts/run_tests.sh $(PYTEST_ARGS)

demo: setup-runtime
	bash scripts/shm_clean.sh
	bash scripts/run_with_ros_env.sh $(PY) -m perception2d_ros.demo $(if $(BAG),--bag $(BAG),)

bench: setup-runtime
	bash scripts/run_with_ros_env.sh $(PY) -m perception2d_ros.cli.main bench all

clean:
	rm -rf build $(VENV) demo_output .pytest_cache
