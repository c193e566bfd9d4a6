#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs missing tools, then checks formatting,
# lints, and runs every test (unit, simulation, and integration tests that start real
# daemons and drive them with real NBD clients).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
