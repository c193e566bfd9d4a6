#!/usr/bin/env bash
# Benchmarks tessera-nbd against nbdkit's memory plugin, measured in the
# same run on the same machine, and prints the ratio. Not a test: numbers
# vary with the host. Needs nbdkit and fio.
#
#   crates/nbd/bench.sh [runtime_seconds]
set -euo pipefail
runtime=${1:-5}
size_mib=256
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/tessera-nbd-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

cargo build -q --release -p tessera-nbd --example mem_server --manifest-path "$root/Cargo.toml"
target=$(cargo metadata -q --format-version 1 --manifest-path "$root/Cargo.toml" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

"$target/release/examples/mem_server" "$dir/tessera.sock" "$size_mib" & pids+=($!)
nbdkit --exit-with-parent -f -U "$dir/nbdkit.sock" memory "${size_mib}M" & pids+=($!)
for s in tessera nbdkit; do
  for _ in $(seq 50); do [ -S "$dir/$s.sock" ] && break; sleep 0.1; done
done

iops() { # socket rw bs iodepth
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" \
      --iodepth="$4" --size="${size_mib}M" --time_based --runtime="$runtime" \
      --output-format=json --output="$dir/fio.json" >/dev/null 2>&1
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))' "$dir/fio.json"
}

printf '%-28s %12s %12s %8s\n' workload tessera nbdkit ratio
for w in "randread 4k 32" "randwrite 4k 32" "randread 4k 1" "read 1m 8" "write 1m 8"; do
  set -- $w
  t=$(iops "$dir/tessera.sock" "$1" "$2" "$3")
  n=$(iops "$dir/nbdkit.sock" "$1" "$2" "$3")
  printf '%-28s %12s %12s %8s\n' "$1 bs=$2 qd=$3 (iops)" "$t" "$n" \
    "$(python3 -c "print(f'{$t/max($n,1):.2f}')")"
done
