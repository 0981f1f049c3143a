# Tidepool: `make run` starts the embedded server; `make test` runs the whole suite.
# Everything a fresh Debian machine lacks is installed here (apt, Python venv, models), and the
# heavy caches (cargo target dir, models, venv) live outside the clone so CI reuses them.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/tidepool
export CARGO_TARGET_DIR ?= $(CACHE)/target
export TIDEPOOL_MODELS_DIR ?= $(CACHE)/models
VENV := $(CACHE)/venv
PY := $(VENV)/bin/python
# llama-cpp-python's OpenAI-compatible server: an outside engine for the upstream-backend test.
# PyPI has only its source, so the first install compiles llama.cpp (x86-64-v3, like ours).
LLAMA_CPP_PYTHON_VERSION := 0.3.36
VENV_LCP := $(CACHE)/venv-llamacpp
# The browser tests' npm packages (tests/browser/package-lock.json), installed outside the clone.
NODE_DEPS := $(CACHE)/browser-test
LISTEN ?= 127.0.0.1:8080
CONFIG ?= tidepool.toml
DEBUG_BIN := $(CARGO_TARGET_DIR)/debug/tidepool
RELEASE_BIN := $(CARGO_TARGET_DIR)/release/tidepool
# debootstrap, podman, curl and iproute2: the container image test (scripts/test-image.sh).
# postgresql: the ledger's PostgreSQL tests start a throwaway cluster with its initdb/pg_ctl when
# no server answers (TIDEPOOL_TEST_POSTGRES_URL, else 127.0.0.1:5432). haproxy: the multi-host test.
# chromium: the console's browser tests (tests/browser, driven by the npm package playwright-core).
APT_PACKAGES := cmake clang libclang-dev unzip python3-venv debootstrap podman curl iproute2 postgresql haproxy chromium
# Tests and load benchmarks build with every cargo feature (the fake engine, `fake`, and the
# ledger's test fixtures); `make build`/`make run` build the product without them.
TEST_FEATURES := --all-features

.PHONY: run test deps apt venv venv-llamacpp browser-deps models build build-bench build-debug lint rust-test python-test browser-test k8s-test image-test bench bench-engine peers fmt clean-db

run: deps models build
	@scripts/run-embedded.sh "$(RELEASE_BIN)" "$(CONFIG)" "$(LISTEN)"

test: deps models lint rust-test python-test browser-test k8s-test image-test

deps: apt venv

# Installs only what is missing; `apt-get update` runs once, only if something is.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: tests/python/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
	touch $@

venv-llamacpp: $(VENV_LCP)/.installed-$(LLAMA_CPP_PYTHON_VERSION)
$(VENV_LCP)/.installed-$(LLAMA_CPP_PYTHON_VERSION):
	python3 -m venv $(VENV_LCP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(VENV_LCP)/bin/pip install -q --disable-pip-version-check "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)"
	touch $@

browser-deps: $(NODE_DEPS)/.installed
$(NODE_DEPS)/.installed: tests/browser/package.json tests/browser/package-lock.json
	mkdir -p $(NODE_DEPS)
	cp tests/browser/package.json tests/browser/package-lock.json $(NODE_DEPS)/
	npm ci --prefix $(NODE_DEPS) --no-audit --no-fund --loglevel=error
	touch $@

models:
	@scripts/fetch-models.sh

build:
	cargo build --release --locked -p tidepool

build-bench:
	cargo build --release --locked -p tidepool --features fake

build-debug:
	cargo build --workspace --all-targets $(TEST_FEATURES) --locked

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets $(TEST_FEATURES) --locked -- -D warnings
	scripts/check-layering.sh

# Stops the throwaway PostgreSQL the tests may have started (none if one answered on 5432).
rust-test:
	status=0; cargo nextest run --workspace $(TEST_FEATURES) --locked --no-fail-fast || status=$$?; \
	  scripts/test-postgres.sh stop; exit $$status

# Black-box tests with the official openai SDK against a real `tidepool serve` (debug build, same
# workspace-wide feature set as clippy and nextest so llama.cpp is compiled once;
# dependencies are optimised in the dev profile, so it runs at full speed).
python-test: build-debug venv venv-llamacpp
	TIDEPOOL_BIN=$(DEBUG_BIN) TIDEPOOL_LLAMA_CPP_PYTHON=$(VENV_LCP)/bin/python \
	  $(PY) -m pytest -q tests/python

# The web console in Debian's chromium against real servers (docs/console.md § Tests);
# TIDEPOOL_CONSOLE_SCREENSHOTS=1 also rewrites docs/console/*.png.
browser-test: build-debug browser-deps
	TIDEPOOL_BIN=$(DEBUG_BIN) NODE_PATH=$(NODE_DEPS)/node_modules \
	  node --test --test-reporter=spec tests/browser/console.test.js

# The Kubernetes manifests (deploy/k8s), offline: every overlay rendered by the venv's pinned
# kubectl and validated against several Kubernetes versions' schemas, plus the secret, hardening
# and configuration checks (docs/deploy.md). `tidepool config check` on the rendered
# configurations runs when the debug binary exists (in `make test`, python-test built it).
k8s-test: venv
	TIDEPOOL_KUBECTL=$(VENV)/bin/kubectl TIDEPOOL_BIN=$$(test -x $(DEBUG_BIN) && echo $(DEBUG_BIN)) \
	  $(PY) -m pytest -q tests/k8s

# The container image (deploy/Dockerfile, docs/deploy.md § Container image): builds its `runtime`
# target around an existing binary on a debootstrap'd bookworm base (cached in $(CACHE)/image) and
# serves a chat completion from the image's root filesystem as its user. The binary is the
# release one when `make build` made it after the last debug build, else the debug one `make
# test` builds anyway: a cold release build would add about 20 minutes to CI.
image-test: build-debug
	TIDEPOOL_CACHE=$(CACHE) scripts/test-image.sh "$(DEBUG_BIN)" "$(RELEASE_BIN)"

# Benchmarks run on a release binary built with `--features fake`: `tidepool bench failover` starts
# workers of this binary on the fake engine (same path as `make build`'s binary; cargo rebuilds
# it when the features change).
bench: build-bench peers
	$(RELEASE_BIN) bench engine --llama-server $(HOME)/.cache/tidepool-peers-v3/bin/llama-server
	$(RELEASE_BIN) bench ledger

# The shared peer script's GGML_NATIVE=ON build crashes on AMX CPUs; ours builds the same source
# for Tidepool's own CPU baseline (see the script's header).
peers:
	scripts/build-peer.sh

fmt:
	cargo fmt --all
