# kiln's developer interface. The README documents these targets in this order.
SHELL := /bin/bash
CARGO ?= cargo
# `kiln` as built by this checkout (honours CARGO_TARGET_DIR).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
KILN := $(TARGET_DIR)/debug/kiln

.PHONY: setup run test lint fmt bench build

## setup: install what the build and the tests need (Rust components; more as stages land)
setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required: install Rust from rustup.rs"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest

## build: the CLI and the agent (debug)
build:
	$(CARGO) build --workspace --bins

## run: the main job embedded. Until the embedded builder lands, it validates every example pipeline.
run: setup build
	$(KILN) validate examples/*/pipeline.yaml

## test: every test of the workspace (unit, integration, snapshot, property)
test: setup build
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
