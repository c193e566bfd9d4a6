#!/usr/bin/env bash
# The main job on the embedded default: a local cluster on loopback with file-backed
# devices; creates a volume, writes and reads it through nbdcopy, verifies both copies,
# restarts every daemon and checks the data again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo run --quiet -p tessera -- demo "$@"
