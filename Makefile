# lightning-ood: every command a user runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# torch/torchvision pins that install from this kind of machine's local wheel cache (see README, "Installation").
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

# Training selection: make train-cifar DATASET=cifar100 MODEL=densenet ARGS="--trainer.devices 2"
DATASET ?= cifar10
MODEL ?= resnet18
ARGS ?=
# Real image data for the quick run and the benchmarks (read-only).
SHARED_DATA ?= ../shared/data
# Published weights: the DICE DenseNets (deeplearning-wisc/dice, checkpoints/CIFAR-*/densenet/checkpoint_100.pth.tar)
# saved as checkpoints/published/dice-densenet100-<dataset>.pth.tar, or ../shared/checkpoints where it exists.
PUBLISHED ?= $(firstword $(wildcard ../shared/checkpoints) checkpoints/published)
WEIGHTS ?= $(PUBLISHED)/dice-densenet100-$(DATASET).pth.tar
DATA ?= data
OOD_ROOT ?= $(DATA)

.PHONY: help install demo test test-slow lint format docs train-cifar train-quick ood-shared tune-shared sweep-shared normratio-shared \
	reproduce reproduce-shared import-published bench-train bench-ddp bench-eval bench-score profile-step gpu-check clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev,timm]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the package, its dependencies and the dev tools

DEMO := -c configs/demo.yaml --trainer.logger.init_args.version
demo: $(STAMP) ## Main job, offline (about 4 min on 2 CPU cores): train, statistics, OOD benchmark of every scorer, sweeps
	rm -rf logs/demo checkpoints/demo cache/demo
	$(BIN)/lightning-ood fit $(DEMO) fit
	$(BIN)/lightning-ood test $(DEMO) test --ckpt_path checkpoints/demo/last.ckpt
	$(BIN)/lightning-ood sweep $(DEMO) sweep --ckpt_path checkpoints/demo/last.ckpt --cache_dir cache/demo
	@echo
	@echo "This was the offline demo: a toy stand-in (scikit-learn's 8x8 digits, upsampled), real images but tiny; its"
	@echo "numbers say nothing about the paper's CIFAR/ImageNet results (make reproduce, make reproduce-shared do)."
	@echo "Results table: logs/demo/test/ood_results.md (and .csv, .json, .tex, histograms/); sensitivity: logs/demo/sweep/*.png"
	@echo "TensorBoard (losses, score histograms, sweeps, hparams): $(BIN)/tensorboard --logdir logs/demo"
	@echo "  then open http://localhost:6006"

# The suite in 2 workers of 1 thread each (a test file stays in one worker, its fixtures built once), then the
# numerically sensitive tests again in one process at the machine's thread count: a result that depends on the BLAS
# kernels or the thread count fails here, not on a user's machine.
test: $(STAMP) ## Run the test suite (generated data; tests needing ../shared/data skip when it is absent)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile
	$(BIN)/pytest -q -m numerics -p no:cacheprovider

test-slow: $(STAMP) ## Run the long tests on real data too (marked `slow`)
	$(BIN)/pytest -q -m "slow or not slow"

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP) ## Build the documentation site into docs/_build/html (Sphinx, strict: a warning is an error)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "Docs: docs/_build/html/index.html"

lint: $(STAMP) ## Check style with ruff (lint + format check)
	$(BIN)/ruff check lightning_ood tests benchmarks
	$(BIN)/ruff format --check lightning_ood tests benchmarks

format: $(STAMP) ## Reformat the code with ruff
	$(BIN)/ruff check --fix lightning_ood tests benchmarks
	$(BIN)/ruff format lightning_ood tests benchmarks

# Several seeds: make train-cifar SEEDS="0 1 2" trains and tests each seed, then aggregates them (mean +- std).
SEEDS ?=
# seeds: config args, run name, extra args, extra test args. Fits and tests every seed (logs/<name>/seedN,
# logs/<name>/seedN_test), then aggregates the tests with `lightning-ood report` into logs/<name>/seeds.
define seeds
	set -e; for s in $(SEEDS); do \
		$(BIN)/lightning-ood fit $(1) --seed_everything $$s --trainer.logger.init_args.version seed$$s \
			--checkpoint.dirpath checkpoints/$(2)/seed$$s $(3); \
		$(BIN)/lightning-ood test $(1) $(4) --seed_everything $$s --trainer.logger.init_args.version seed$${s}_test \
			--ckpt_path checkpoints/$(2)/seed$$s/last.ckpt --checkpoint.dirpath checkpoints/$(2)/seed$$s \
			--overwrite_results true $(3); \
	done; \
	$(BIN)/lightning-ood report $(foreach s,$(SEEDS),logs/$(2)/seed$(s)_test) --output logs/$(2)/seeds
endef

train-cifar: $(STAMP) ## Train with the paper's schedule: DATASET=cifar10|cifar100 MODEL=resnet18|densenet SEEDS="0 1 2" ARGS=...
ifeq ($(strip $(SEEDS)),)
	$(BIN)/lightning-ood fit -c configs/$(DATASET)_$(MODEL).yaml $(ARGS)
else
	$(call seeds,-c configs/$(DATASET)_$(MODEL).yaml,$(DATASET)_$(MODEL),$(ARGS))
endif

QUICK := -c configs/cifar10_resnet18.yaml -c configs/overlays/quick_cpu.yaml --data.init_args.root $(SHARED_DATA)/cifar10-jpeg
train-quick: $(STAMP) ## Short real CPU run: ResNet-20, 6 epochs on ../shared/data/cifar10-jpeg, then its test (SEEDS="0 1 2")
ifeq ($(strip $(SEEDS)),)
	$(BIN)/lightning-ood fit $(QUICK) $(ARGS)
	$(BIN)/lightning-ood test $(QUICK) --ckpt_path checkpoints/quick_cpu/last.ckpt --overwrite_results true $(ARGS)
else
	$(call seeds,$(QUICK),quick_cpu,$(ARGS),-c configs/ood/shared_data.yaml)
endif

SHARED := -c configs/cifar10_resnet18.yaml -c configs/overlays/quick_cpu.yaml -c configs/ood/shared_data.yaml \
	--ckpt_path checkpoints/quick_cpu/last.ckpt
ood-shared: $(STAMP) ## OOD table of the train-quick model on ../shared/data (ID CIFAR-10 JPEG; TIN, MNIST, F-MNIST)
	$(BIN)/lightning-ood test $(SHARED) $(ARGS)

tune-shared: $(STAMP) ## Select p and lambda on Gaussian noise (paper, Sec. V-F) for the train-quick model
	$(BIN)/lightning-ood tune $(SHARED) --output checkpoints/quick_cpu/selected.yaml $(ARGS)

sweep-shared: $(STAMP) ## Sensitivity to lambda and p (paper, Figs. 6-7) of the train-quick model on ../shared/data
	$(BIN)/lightning-ood sweep $(SHARED) $(ARGS)

normratio-shared: $(STAMP) ## FeatureNorm block by NormRatio for the train-quick model, then its OOD table with FeatureNorm
	$(BIN)/lightning-ood tune $(SHARED) --scorer featurenorm --output checkpoints/quick_cpu/featurenorm.yaml $(ARGS)
	$(BIN)/lightning-ood test $(SHARED) -c checkpoints/quick_cpu/featurenorm.yaml

reproduce: $(STAMP) ## The paper's DenseNet rows (Tables I, III, IV) with the DICE checkpoints: DATASET= WEIGHTS= DATA= OOD_ROOT=
	$(BIN)/lightning-ood test -c configs/paper/$(DATASET)_densenet.yaml --model.weights $(WEIGHTS) \
		--data.init_args.root $(DATA) --data.init_args.ood_root $(OOD_ROOT) $(ARGS)

PAPER_SHARED := -c configs/paper/cifar10_densenet.yaml -c configs/ood/shared_data.yaml \
	--model.weights $(PUBLISHED)/dice-densenet100-cifar10.pth.tar
reproduce-shared: $(STAMP) ## The DICE CIFAR-10 DenseNet on ../shared/data (TIN, MNIST, F-MNIST, noise): every paper scorer
	$(BIN)/lightning-ood test $(PAPER_SHARED) $(ARGS)

import-published: $(STAMP) ## Convert a published checkpoint + fit its statistics into a .ckpt: WEIGHTS= DATASET= DATA= OUT=
	$(BIN)/lightning-ood import -c configs/paper/$(DATASET)_densenet.yaml --model.weights $(WEIGHTS) \
		--data.init_args.root $(DATA) --output $(or $(OUT),checkpoints/published/$(DATASET)_densenet.ckpt) $(ARGS)

bench-train: $(STAMP) ## Training throughput on ../shared/data/cifar10-jpeg: fit vs a plain loop vs PIL (ARGS=--cuda-graphs)
	$(BIN)/python benchmarks/bench_train.py --data $(SHARED_DATA)/cifar10-jpeg $(ARGS)

bench-ddp: $(STAMP) ## How far N processes' scores are from one's, every scorer (ARGS: --devices, --accelerator gpu, --precision)
	$(BIN)/python benchmarks/bench_ddp.py $(ARGS)

bench-eval: $(STAMP) ## Evaluation cost (ResNet-18): one forward pass vs the full test with every scorer (ARGS: --backbone, --per-scorer, --device)
	$(BIN)/python benchmarks/bench_eval.py $(ARGS)

bench-score: $(STAMP) ## Each scorer on 300,000 cached features (L=512, C=100, chunks of 65,536) vs the bare head product
	$(BIN)/python benchmarks/bench_score.py $(ARGS)

profile-step: $(STAMP) ## Where one training step's time goes (ResNet-18): eager vs CUDA graphs, launches and syncs on a GPU
	$(BIN)/python benchmarks/profile_step.py --data $(SHARED_DATA)/cifar10-jpeg $(ARGS)

# The GPU check runs without the venv where there is none (a bare CUDA machine: see benchmarks/gpu_remote.sh). DATA and
# OOD_ROOT not given: ../shared/data's CIFAR-10 JPEG copy, MNIST and Fashion-MNIST.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_DATA = $(if $(filter file,$(origin DATA)),$(SHARED_DATA)/cifar10-jpeg,$(DATA))
GPU_OOD_ROOT = $(if $(filter file,$(origin OOD_ROOT)),$(SHARED_DATA),$(OOD_ROOT))
gpu-check: ## One CUDA GPU, a few minutes: fit, test, tune (fmls, featurenorm)/sweep, benchmarks (DATA=, OOD_ROOT=; ARGS=--allow-cpu)
	$(GPU_PYTHON) benchmarks/gpu_check.py --data $(GPU_DATA) --ood-root $(GPU_OOD_ROOT) $(ARGS)

clean: ## Remove logs, checkpoints, the feature cache and tool caches (keeps .venv; `rm -rf .venv` for a full reset)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info logs lightning_logs checkpoints cache .bench docs/_build docs/_generated
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
