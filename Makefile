# kiln's developer interface. The README documents these targets in this order.
SHELL := /bin/bash
CARGO ?= cargo
# `kiln` as built by this checkout (honours CARGO_TARGET_DIR).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
KILN := $(TARGET_DIR)/debug/kiln
# The tools the tests use, pinned by the lock files in tests/tools/ and installed by `make setup`
# under .venv (or $KILN_VENV): one Python environment per tool whose pins conflict (python: moto
# server, cfn-lint, aws-sam-translator, cargo-lambda; sam: the SAM CLI; checkov: checkov and
# parliament), node: the npm tools.
VENV := $(abspath $(or $(KILN_VENV),.venv))
TOOLS := tests/tools
export KILN_VENV := $(VENV)
export KILN_MOTO_SERVER := $(VENV)/python/bin/moto_server
export KILN_CFN_LINT := $(VENV)/python/bin/cfn-lint
export KILN_PYTHON := $(VENV)/python/bin/python
export KILN_SAM := $(VENV)/sam/bin/sam
export KILN_CHECKOV := $(VENV)/checkov/bin/checkov
export KILN_PARLIAMENT := $(VENV)/checkov/bin/parliament
export KILN_NODE_MODULES := $(VENV)/node/node_modules
export KILN_ASL_VALIDATOR := $(KILN_NODE_MODULES)/.bin/asl-validator
# cargo-nextest, as `cargo install --locked` installs it when the machine's differs.
NEXTEST_VERSION := 0.9.143
# The template CloudFormation runs: infra/template.yaml through aws-sam-translator (infra/expand.py).
EXPANDED := $(TARGET_DIR)/infra/template.expanded.json

# Debian packages are installed as root (sudo when not root).
DEBIAN_PACKAGES := skopeo umoci mmdebstrap zstd sqlite3 slirp4netns uidmap iproute2 nftables curl bsdutils podman runc
# A command of each package, to tell whether it is installed.
DEBIAN_COMMANDS := skopeo umoci mmdebstrap zstd sqlite3 slirp4netns newuidmap ip nft curl script podman runc
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

# The Lambda functions; arm64 when the aarch64 standard library is installed, else x86_64.
FUNCTIONS := launch-builder customize snapshot test-image distribute cleanup trigger wake
HAS_ARM64 := $(filter aarch64-unknown-linux-gnu,$(shell rustup target list --installed 2>/dev/null))
LAMBDA_ARCH := $(if $(HAS_ARM64),arm64,x86-64)
SAM_ARCH := $(if $(HAS_ARM64),arm64,x86_64)
# The functions as `make test` builds them for the rehearsal: this machine's architecture.
HOST_LAMBDA_ARCH := $(if $(filter aarch64,$(shell uname -m)),arm64,x86-64)
# What ships, built by `make test` with the shipped features, apart from the workspace build (whose
# feature unification would hide a missing one): the functions as `make package` builds them,
# the CLI as `make run` builds it.
SHIPPED_DIR := $(TARGET_DIR)/shipped
export KILN_SHIPPED_DIR := $(abspath $(SHIPPED_DIR))
STACK ?= kiln
TOOLS_PATH := $(VENV)/python/bin:$(VENV)/sam/bin:$(PATH)

.PHONY: setup run test lint fmt bench build package deploy chaos mutants

## setup: install what the build and the tests need, each at the version its lock pins: Rust
## components, cargo-nextest; from PyPI (hash-checked, tests/tools/*.txt) moto server, cfn-lint,
## aws-sam-translator, cargo-lambda, the SAM CLI, checkov, parliament; from npm (`npm ci`,
## tests/tools/package-lock.json) asl-validator and @cloud-copilot/iam-simulate; Debian packages.
## An environment whose lock changed is made anew (a stamp of the lock's hash).
setup:
	@command -v $(CARGO) >/dev/null || { echo "cargo is required: install Rust from rustup.rs"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy
	@$(CARGO) nextest --version 2>/dev/null | grep -q '^cargo-nextest $(NEXTEST_VERSION) ' || $(CARGO) install --locked --version $(NEXTEST_VERSION) cargo-nextest
	@for env in python sam checkov; do \
	  lock=$(TOOLS)/$$env.txt; stamp=$(VENV)/$$env/.lock-$$(sha256sum $$lock | cut -c1-16); \
	  test -f $$stamp && continue; \
	  echo "installing $$lock into $(VENV)/$$env"; rm -rf $(VENV)/$$env; \
	  python3 -m venv $(VENV)/$$env && \
	  $(VENV)/$$env/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $$lock && \
	  touch $$stamp || exit 1; \
	done
	@stamp=$(VENV)/node/.lock-$$(cat $(TOOLS)/package.json $(TOOLS)/package-lock.json | sha256sum | cut -c1-16); \
	test -f $$stamp || { echo "installing $(TOOLS)/package-lock.json into $(VENV)/node (npm ci)"; rm -rf $(VENV)/node && mkdir -p $(VENV)/node && \
	  cp $(TOOLS)/package.json $(TOOLS)/package-lock.json $(VENV)/node/ && \
	  npm ci --silent --no-audit --no-fund --prefix $(VENV)/node >/dev/null && touch $$stamp; }
	@missing=; for c in $(DEBIAN_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	test -z "$$missing" || { echo "installing $(DEBIAN_PACKAGES) (Debian packages)"; $(APT_GET) install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null || { $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; }; }
	@# Embedded instances' private network (slirp4netns) opens /dev/net/tun as the user who runs kiln;
	@# stock Debian has it 0666, some container hosts 0600.
	@test ! -c /dev/net/tun || test "$$(stat -c %a /dev/net/tun)" = 666 || { test "$$(id -u)" = 0 && chmod 0666 /dev/net/tun && echo "made /dev/net/tun 0666, as on a stock Debian (embedded instances' private network)"; } || echo "note: /dev/net/tun is not 0666: only root's embedded instances get network: private"

## build: every binary of the workspace (debug): kiln, kiln-agent, the Lambda functions
build:
	$(CARGO) build --workspace --bins

## run: the main job embedded: examples/hello built, tested and distributed to two regions in
## sandboxes on this machine (root or an ordinary user; no network, no AWS account). kiln is
## built without the AWS SDK here, which keeps the first build short.
run:
	$(CARGO) build -p kiln-agent -p kiln-cli --no-default-features
	$(KILN) validate examples/*/pipeline.yaml
	$(KILN) run examples/hello/pipeline.yaml

## test: every test of the workspace (unit, integration, snapshot, property). Binaries and tests
## are built in one `--all-targets` pass, so dependencies compile once with one feature set; then
## what ships, in its own target dir with its own features: the eight functions by one `cargo
## lambda build` as `make package` runs it (debug), which the rehearsal's main build runs, and the
## CLI as `make run` builds it, which a test runs on examples/hello.
test: setup
	$(CARGO) build --workspace --all-targets
	CARGO_TARGET_DIR=$(abspath $(SHIPPED_DIR)) PATH="$(TOOLS_PATH)" $(CARGO) lambda build --$(HOST_LAMBDA_ARCH) $(addprefix -p ,$(FUNCTIONS))
	$(CARGO) build -p kiln-agent -p kiln-cli --no-default-features --target-dir $(SHIPPED_DIR)
	$(CARGO) nextest run --workspace --no-fail-fast

## chaos: the fault campaigns with more builds than make test runs: the deployed-stack rehearsal
## (KILN_CHAOS_BUILDS, default 1000) and the embedded cloud (KILN_CHAOS_EMBEDDED_BUILDS, default
## 1000), one KILN_CHAOS_SEED; each prints builds, faults by kind, leftovers
KILN_CHAOS_BUILDS ?= 1000
KILN_CHAOS_EMBEDDED_BUILDS ?= 1000
chaos: setup
	$(CARGO) build --workspace --all-targets
	KILN_CHAOS_BUILDS=$(KILN_CHAOS_BUILDS) KILN_CHAOS_EMBEDDED_BUILDS=$(KILN_CHAOS_EMBEDDED_BUILDS) $(CARGO) nextest run --workspace --no-capture -E 'test(fault_campaign)'

## mutants: each committed mutation of a guard (tests/mutants/*.patch: a template condition, a
## grant, a stand-in's refusal, a CLI check) applied to a scratch worktree of HEAD and the test its
## header names run: every one must fail (KILLED). Outside CI; MUTANT=name runs one.
mutants: setup
	@test -x $(SHIPPED_DIR)/lambda/trigger/bootstrap || { echo "make mutants runs the functions make test builds: run make test first"; exit 2; }
	tests/mutants/run $(MUTANT)

## lint: formatting and clippy, warnings are errors; the stack as CloudFormation sees it: the
## template expanded by aws-sam-translator, then cfn-lint, checkov and parliament on the result
## (zero findings; waivers with their reasons in infra/checkov.yaml and infra/parliament.yaml)
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(KILN_PYTHON) infra/expand.py infra/template.yaml -o $(EXPANDED)
	$(KILN_PYTHON) infra/cfn_lint.py $(EXPANDED)
	$(KILN_CHECKOV) --config-file infra/checkov.yaml --framework cloudformation -f $(EXPANDED)
	rm -rf $(TARGET_DIR)/infra/policies && $(KILN_PYTHON) infra/policies.py $(EXPANDED) $(TARGET_DIR)/infra/policies
	$(KILN_PARLIAMENT) --config infra/parliament.yaml --directory $(TARGET_DIR)/infra/policies --include_policy_extension json

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## package: every Lambda function built by cargo-lambda (release; arm64 when the aarch64 standard
## library is installed, else x86_64) into $(TARGET_DIR)/lambda/<function>/bootstrap, and the
## release kiln-agent. Uploads nothing.
package: setup
	@echo "packaging the Lambda functions for $(SAM_ARCH)$(if $(HAS_ARM64),, (no aarch64 standard library here: \`rustup target add aarch64-unknown-linux-gnu\` for arm64))"
	PATH="$(TOOLS_PATH)" $(CARGO) lambda build --release --$(LAMBDA_ARCH) $(addprefix -p ,$(FUNCTIONS))
	$(CARGO) build --release -p kiln-agent
	@echo "  bootstrap        bytes       the AWS SDK clients linked (operations)"
	@for f in $(FUNCTIONS); do b=$(TARGET_DIR)/lambda/$$f/bootstrap; printf "  %-15s %10s  " $$f $$(stat -c %s $$b); \
	  strings $$b | grep -oE 'aws-sdk-[a-z0-9]+-[0-9.]+/src/operation/[a-z0-9_]+' | sed -E 's|^aws-sdk-([a-z0-9]+)-[0-9.]+/src/operation/|\1 |' | sort -u | \
	  awk '{n[$$1]++} END {for (c in n) printf "%s(%d) ", c, n[c]; print ""}'; done
	@printf "  %-15s %10s bytes\n" kiln-agent $$(stat -c %s $(TARGET_DIR)/release/kiln-agent)

## deploy: sam build + sam deploy --guided (stack $(STACK)) with the release agent's SHA-256 pinned
## (AgentSha256), then that agent to the artifacts bucket
deploy: package
	$(CARGO) build -p kiln-cli
	cd infra && PATH="$(TOOLS_PATH)" sam build --parameter-overrides Architecture=$(SAM_ARCH)
	cd infra && PATH="$(TOOLS_PATH)" sam deploy --guided --stack-name $(STACK) --parameter-overrides Architecture=$(SAM_ARCH) AgentSha256=$$(uname -m)=$$(sha256sum $(abspath $(TARGET_DIR))/release/kiln-agent | cut -d' ' -f1)
	bucket=$$(cd infra && PATH="$(TOOLS_PATH)" sam list stack-outputs --stack-name $(STACK) --output json | python3 -c 'import json,sys; print(next(o["OutputValue"] for o in json.load(sys.stdin) if o["OutputKey"] == "ArtifactsBucketName"))') && \
	  $(KILN) upload-agent --artifacts-bucket "$$bucket" $(TARGET_DIR)/release/kiln-agent

## bench: measured ratios against a baseline in the same run
bench: package
	$(CARGO) bench -p kiln --bench validate
	$(CARGO) bench -p kiln --features engine --bench engine
	$(CARGO) bench -p kiln-agent --bench steps
	$(CARGO) build --release -p kiln-agent
	@echo "kiln-agent release binary: $$(stat -c %s $(TARGET_DIR)/release/kiln-agent) bytes"
	PATH="$(TOOLS_PATH)" $(CARGO) lambda build --release --$(LAMBDA_ARCH) -p kiln-lambda-baseline
	# The harnesses in debug (they start processes and read JSON); what they time is release.
	$(CARGO) build --workspace --bins
	KILN_LAMBDA_DIR=$(abspath $(TARGET_DIR))/lambda $(CARGO) nextest run -p kiln-tests --no-capture -E 'test(lambda_cold_start_bench)'
	@if [ "$$(id -u)" = 0 ]; then \
	  $(CARGO) build --release -p kiln-cli -p kiln-agent --no-default-features && \
	  $(TARGET_DIR)/debug/kiln-embedded-bench $(TARGET_DIR)/release/kiln .; \
	else echo "embedded bench skipped: it starts sandboxes, run make bench as root"; fi
