# kiln's developer interface. The README documents these targets in this order.
SHELL := /bin/bash
CARGO ?= cargo
# `kiln` as built by this checkout (honours CARGO_TARGET_DIR).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
KILN := $(TARGET_DIR)/debug/kiln
# Python tools the tests use (moto server), in a virtualenv: .venv, or $KILN_VENV.
VENV := $(abspath $(or $(KILN_VENV),.venv))
export KILN_MOTO_SERVER := $(VENV)/bin/moto_server
export KILN_CFN_LINT := $(VENV)/bin/cfn-lint
export KILN_SAM := $(VENV)/bin/sam
export KILN_ASL_VALIDATOR := $(VENV)/node/node_modules/.bin/asl-validator

# Debian packages are installed as root (sudo when not root).
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: setup run test lint fmt bench build

## setup: install what the build and the tests need (Rust components, cargo-nextest; moto server, cfn-lint, SAM CLI from PyPI; asl-validator from npm)
setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required: install Rust from rustup.rs"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@test -x $(VENV)/bin/moto_server || { echo "installing moto[server] into $(VENV)"; $(VENV)/bin/pip install --quiet 'moto[server]>=5.1,<6'; }
	@test -x $(VENV)/bin/cfn-lint -a -x $(VENV)/bin/sam || { echo "installing cfn-lint and aws-sam-cli into $(VENV)"; $(VENV)/bin/pip install --quiet cfn-lint aws-sam-cli; }
	@test -x $(KILN_ASL_VALIDATOR) || { echo "installing asl-validator (npm) into $(VENV)/node"; npm install --silent --no-audit --no-fund --prefix $(VENV)/node asl-validator@3 >/dev/null; }
	@command -v skopeo >/dev/null && command -v umoci >/dev/null && command -v mmdebstrap >/dev/null || { echo "installing skopeo, umoci, mmdebstrap (Debian packages)"; $(APT_GET) install -y -qq --no-install-recommends skopeo umoci mmdebstrap >/dev/null || { $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends skopeo umoci mmdebstrap >/dev/null; }; }

## build: every binary of the workspace (debug): kiln, kiln-agent, the Lambda functions
build:
	$(CARGO) build --workspace --bins

## run: the main job embedded: examples/hello built, tested and distributed to two regions in
## sandboxes on this machine (root; no network, no AWS account). kiln is built without the AWS
## SDK here, which keeps the first build short.
run:
	@test "$$(id -u)" = 0 || { echo "make run starts sandboxed instances (namespaces, overlay mounts): run it as root"; exit 2; }
	$(CARGO) build -p kiln-agent -p kiln-cli --no-default-features
	$(KILN) validate examples/*/pipeline.yaml
	$(KILN) run examples/hello/pipeline.yaml

## test: every test of the workspace (unit, integration, snapshot, property). Binaries and tests
## are built in one `--all-targets` pass, so dependencies compile once with one feature set.
test: setup
	$(CARGO) build --workspace --all-targets
	$(CARGO) nextest run --workspace --no-fail-fast

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## bench: measured ratios against a baseline in the same run
bench:
	$(CARGO) bench -p kiln --bench validate
	$(CARGO) bench -p kiln --features engine --bench engine
	$(CARGO) bench -p kiln-agent --bench steps
	$(CARGO) build --release -p kiln-agent
	@echo "kiln-agent release binary: $$(stat -c %s $(TARGET_DIR)/release/kiln-agent) bytes"
