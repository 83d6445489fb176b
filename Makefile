# rsql-agent: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
# The packaging tools, pinned and installed under .tools/ (not on PATH; called by path).
TOOLS := .tools
CARGO_DEB_VERSION := 3.8.0
CARGO_GENERATE_RPM_VERSION := 0.21.1
CARGO_DEB_STAMP := $(TOOLS)/.cargo-deb-$(CARGO_DEB_VERSION)
CARGO_GENERATE_RPM_STAMP := $(TOOLS)/.cargo-generate-rpm-$(CARGO_GENERATE_RPM_VERSION)
# The release binaries link against the glibc 2.17 symbol set that Zig ships, so the packages
# install on every glibc from 2.17 on (RHEL/CentOS 7, Amazon Linux 2, RHEL 8, ...), whatever
# glibc builds them. cargo-zigbuild and Zig are PyPI wheels (no compile), in their own venv.
CARGO_ZIGBUILD_VERSION := 0.24.1
ZIGLANG_VERSION := 0.17.0
ZIG_VENV := $(TOOLS)/zig
ZIG_STAMP := $(ZIG_VENV)/.cargo-zigbuild-$(CARGO_ZIGBUILD_VERSION)-ziglang-$(ZIGLANG_VERSION)
GLIBC_CEILING := 2.17
RELEASE_TRIPLE := $(shell uname -m)-unknown-linux-gnu
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
RELEASE_DIR := $(TARGET_DIR)/$(RELEASE_TRIPLE)/release
# The binaries in the packages, as NAME:DIRECTORY (where both packages install NAME). The
# build, the strip, the glibc ceiling check and check-package all read this one list; the
# package contents themselves are the assets in agent/Cargo.toml.
PACKAGED_BINS := rsql-agent:/usr/bin rsql-wrapper:/usr/bin rsql-job-owner:/usr/libexec/rsql-agent
PACKAGED_BIN_NAMES := $(foreach b,$(PACKAGED_BINS),$(firstword $(subst :, ,$(b))))
export PACKAGED_BINS GLIBC_CEILING

# The previous main that `make bench` measures the current tree against, side by side:
# b843910 is main as it stood when the job owner rewrite began (its last commit before the
# rewrite's), so the table shows what the rewrite changed. Any commit works:
# `make bench BENCH_BASELINE=<rev>`.
BENCH_BASELINE ?= b843910
# Its worktree (src/) and its release binaries (bin/), built with this tree's target dir.
BENCH_BASELINE_DIR := $(abspath $(TARGET_DIR))/bench-baseline
# Measured jobs per launcher x build in the launchers' part (after 3 warm-up jobs each).
BENCH_LAUNCHER_JOBS ?= 100
BENCH_DEB = RSQL_AGENT_DEB=$$(ls $(abspath $(TARGET_DIR))/debian/rsql-agent_*.deb | tail -n 1)

.PHONY: demo test deps build release venv fmt-check clippy lint-cfn check-systemd nextest bench bench-baseline bench-profile bench-root bench-launchers bench-smoke tools package release-aarch64 check-package clean

## demo: run the blog workflow on a throwaway PostgreSQL with `rsql-agent workflow run`
# `build` compiled rsql-demo with every other binary of the workspace, in one feature
# resolution; running it through `cargo run -p` would resolve features for that one package
# and build the AWS SDK crates a second time.
demo: deps build
	$(TARGET_DIR)/debug/rsql-demo

## deps: system packages the demo and the tests need (PostgreSQL), installed when missing
deps:
	@bash .ci/install-deps

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --workspace --release --bins

## venv: the project-local virtualenv with the pinned AWS emulator (moto) and linters
venv: $(VENV_STAMP)
$(VENV_STAMP): tests/moto/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/moto/requirements.txt
	touch $@

fmt-check:
	$(CARGO) fmt --all -- --check

## lint-cfn: cfn-lint (pinned in tests/moto/requirements.txt) on the CloudFormation stack
lint-cfn: venv
	$(VENV)/bin/cfn-lint packaging/aws/stack.yaml

## check-systemd: `systemd-analyze verify` and the `security --offline` exposure of the unit
check-systemd: deps
	bash packaging/check-systemd.sh

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The real-systemd tests (tests/tests/systemd_host.rs) install the .deb that `package` built,
# in a systemd booted as PID 1 of its own namespaces (tests/sandbox/sandbox.sh; needs root).
# rsql-with-moto starts one AWS emulator that the whole run shares (tests/src/moto.rs).
nextest: deps venv build package
	RSQL_AGENT_DEB=$$(ls $(abspath $(TARGET_DIR))/debian/rsql-agent_*.deb | tail -n 1) \
	  $(abspath $(TARGET_DIR))/debug/rsql-with-moto \
	  $(CARGO) nextest run --workspace --no-fail-fast

## test: everything CI runs: formatting, lints, unit tests, system tests, the bench smoke run
## and the packages (built, inspected, installed and removed again)
test: fmt-check clippy lint-cfn check-systemd nextest bench-smoke check-package

## bench: the previous main ($(BENCH_BASELINE)) and the current tree, side by side in one
## sitting, release builds (about 7 minutes after the builds; root; not part of `make test`):
## rsql-bench (figures 1-3 of both builds interleaved, then the rest for the current one;
## bench/results.json), then the launchers in a real systemd (bench/launchers.json)
# The order of the builds matters: the baseline's build leaves its binaries in
# $(TARGET_DIR)/release (the shared target directory), so the current tree's release build
# runs after it, right before the measurements; rsql-bench refuses to compare a build with
# itself.
bench: bench-root venv package
	$(MAKE) --no-print-directory bench-baseline
	$(MAKE) --no-print-directory release
	$(TARGET_DIR)/release/rsql-bench --baseline-bin-dir $(BENCH_BASELINE_DIR)/bin
	$(BENCH_DEB) $(TARGET_DIR)/release/rsql-bench-launchers \
	  --baseline-bin-dir $(BENCH_BASELINE_DIR)/bin --jobs $(BENCH_LAUNCHER_JOBS)

## bench-baseline: the previous main's rsql-agent, rsql-job-owner and rsql-wrapper (release) in
## $(BENCH_BASELINE_DIR)/bin, from a git worktree of $(BENCH_BASELINE) beside them (reused)
bench-baseline:
	CARGO=$(CARGO) bash tests/bench/baseline.sh $(BENCH_BASELINE) $(BENCH_BASELINE_DIR) $(abspath $(TARGET_DIR))

bench-root:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make: the bench boots systemd in its own namespaces for the launchers' figures and needs root: run it as root (nothing was measured)" >&2; \
	  exit 1; \
	fi

## bench-launchers: the launchers' part of `make bench` alone: job start cost (dispatch,
## completion to callback, CPU per job with PID 1's, journald's and dbus-daemon's shares) under
## the systemd launcher (the packaged owner units) and the direct one, for the previous main
## and the current tree, on the installed .deb in a real systemd (root). bench/launchers.json
bench-launchers: bench-root venv package
	$(MAKE) --no-print-directory bench-baseline
	$(MAKE) --no-print-directory release
	$(BENCH_DEB) $(TARGET_DIR)/release/rsql-bench-launchers \
	  --baseline-bin-dir $(BENCH_BASELINE_DIR)/bin --jobs $(BENCH_LAUNCHER_JOBS)

## bench-profile: where a job's overhead goes, previous main and current tree, in one sitting:
## `perf record -g` over 300 trivial jobs each (rsql-bench --only cpu), broken down by system
## call and user-space work (tests/bench/profile.sh; needs perf; root). Written to bench/profile/
bench-profile: bench-root venv
	$(MAKE) --no-print-directory bench-baseline
	$(MAKE) --no-print-directory release
	bash tests/bench/profile.sh $(TARGET_DIR)/release/rsql-bench $(BENCH_BASELINE_DIR)/bin bench/profile

## bench-smoke: the same program with a few jobs per figure (debug build; checks sanity, not targets)
bench-smoke: venv build
	$(TARGET_DIR)/debug/rsql-bench --smoke

## tools: cargo-deb and cargo-generate-rpm (built, minutes, once), cargo-zigbuild and Zig
## (PyPI wheels, seconds) at the pinned versions, under .tools/
tools: $(CARGO_DEB_STAMP) $(CARGO_GENERATE_RPM_STAMP) $(ZIG_STAMP)
$(CARGO_DEB_STAMP):
	$(CARGO) install --locked --quiet --root $(TOOLS) cargo-deb --version $(CARGO_DEB_VERSION)
	touch $@
$(CARGO_GENERATE_RPM_STAMP):
	$(CARGO) install --locked --quiet --root $(TOOLS) cargo-generate-rpm --version $(CARGO_GENERATE_RPM_VERSION)
	touch $@
$(ZIG_STAMP):
	rm -rf $(ZIG_VENV)
	$(PYTHON) -m venv $(ZIG_VENV)
	$(ZIG_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  cargo-zigbuild==$(CARGO_ZIGBUILD_VERSION) ziglang==$(ZIGLANG_VERSION)
	touch $@

## package: target/debian/rsql-agent_<version>-1_<arch>.deb and
## target/generate-rpm/rsql-agent-<version>-1.<arch>.rpm, from one release build of the
## packaged binaries for glibc $(GLIBC_CEILING) (the test programs in tests/ are not built
## and not packaged)
# cargo-zigbuild runs cargo with Zig as the C compiler and linker (aws-lc-sys included),
# against Zig's glibc 2.17 headers and symbol set; the binaries land in target/<triple>/release.
# The release profile keeps line tables (about 160 MB a binary): the packages get copies
# without them, which keep the symbol table, so a RUST_BACKTRACE backtrace still names functions.
package: tools
	CARGO_ZIGBUILD_PYTHON_PATH=$(abspath $(ZIG_VENV))/bin/python $(ZIG_VENV)/bin/cargo-zigbuild zigbuild \
	  --release --target $(RELEASE_TRIPLE).$(GLIBC_CEILING) $(addprefix --bin ,$(PACKAGED_BIN_NAMES))
	mkdir -p $(TARGET_DIR)/release/stripped
	for bin in $(PACKAGED_BIN_NAMES); do \
	  strip --strip-debug -o $(TARGET_DIR)/release/stripped/$$bin $(RELEASE_DIR)/$$bin || exit 1; \
	done
	bash packaging/check-glibc.sh $(addprefix $(TARGET_DIR)/release/stripped/,$(PACKAGED_BIN_NAMES))
	rm -f $(TARGET_DIR)/debian/rsql-agent_*.deb $(TARGET_DIR)/generate-rpm/rsql-agent-*.rpm
	$(TOOLS)/bin/cargo-deb -p rsql-agent --no-build
	$(TOOLS)/bin/cargo-generate-rpm -p agent

## release-aarch64: the packaged binaries for Graviton (aarch64, glibc 2.17), stripped, in
## target/aarch64-unknown-linux-gnu/release/stripped (not packaged; not part of `make test`)
# rustup's aarch64 standard library cannot be fetched here, so this build uses Debian's
# rustc-web, whose arm64 standard library is a Debian package: packaging/fetch-rust-aarch64.sh
# unpacks both under .tools/ without installing anything. Zig brings the aarch64 C compiler,
# linker and glibc 2.17 stubs.
RUST_AARCH64 := $(TOOLS)/rust-aarch64
RUST_AARCH64_STAMP := $(RUST_AARCH64)/.unpacked
AARCH64_DIR := $(TARGET_DIR)/aarch64-unknown-linux-gnu/release
$(RUST_AARCH64_STAMP):
	bash packaging/fetch-rust-aarch64.sh $(RUST_AARCH64)
	touch $@
release-aarch64: $(ZIG_STAMP) $(RUST_AARCH64_STAMP)
	RUSTC=$(abspath $(RUST_AARCH64))/root/usr/bin/rustc \
	LD_LIBRARY_PATH=$(abspath $(RUST_AARCH64))/root/usr/lib/x86_64-linux-gnu \
	CARGO_ZIGBUILD_PYTHON_PATH=$(abspath $(ZIG_VENV))/bin/python $(ZIG_VENV)/bin/cargo-zigbuild zigbuild \
	  --release --target aarch64-unknown-linux-gnu.$(GLIBC_CEILING) $(addprefix --bin ,$(PACKAGED_BIN_NAMES))
	mkdir -p $(AARCH64_DIR)/stripped
	for bin in $(PACKAGED_BIN_NAMES); do \
	  LD_LIBRARY_PATH=$(abspath $(RUST_AARCH64))/root/usr/lib/x86_64-linux-gnu \
	    $(RUST_AARCH64)/root/usr/bin/aarch64-linux-gnu-strip --strip-debug \
	    -o $(AARCH64_DIR)/stripped/$$bin $(AARCH64_DIR)/$$bin || exit 1; \
	done
	bash packaging/check-glibc.sh $(addprefix $(AARCH64_DIR)/stripped/,$(PACKAGED_BIN_NAMES))

## check-package: lists both packages, then installs the .deb on this machine (root), checks
## the binaries, the config, the user and the shim, and removes and purges it again
check-package: deps package
	bash packaging/check-package.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) $(TOOLS)
