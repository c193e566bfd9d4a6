#!/usr/bin/env bash
# Rebuild time after losing one SDS, for the same data on 3, 5 and 8 SDSs, with every
# device's back-fill throttled to the same bandwidth. Because PGs spread over all SDSs,
# every survivor rebuilds a share of the lost SDS at once: the time should fall as the pool
# grows.
#
#   scripts/bench-rebuild.sh            # 512 MiB of data, 16 MiB/s per device
#   BENCH_DATA_MIB=256 BENCH_REBUILD_MIB_PER_SEC=8 BENCH_SDS_COUNTS="3 5" scripts/bench-rebuild.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data_mib=${BENCH_DATA_MIB:-512}
rate=${BENCH_REBUILD_MIB_PER_SEC:-16}
counts=${BENCH_SDS_COUNTS:-3 5 8}
base_port=${BENCH_BASE_PORT:-7970}
bin=${TESSERA_BIN:-$root/target/release/tessera}
die() { echo "bench-rebuild.sh: $*" >&2; exit 1; }
for tool in nbdcopy python3; do command -v "$tool" >/dev/null || die "missing tool: $tool"; done
[ -x "$bin" ] || (cd "$root" && cargo build --release -p tessera) || die "cannot build tessera"
work=$(mktemp -d /tmp/tessera-bench-rebuild.XXXXXX)
dir=""
cleanup() { [ -n "$dir" ] && "$bin" down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
head -c "$((data_mib << 20))" /dev/urandom > "$work/data"

status_field() { # python expression over the status JSON `s`
  "$bin" --config "$dir/tessera.toml" --json cluster status | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}

printf '%-5s %-12s %-14s %-12s %s\n' sds lost_MiB rebuild_s MiB_per_s speedup_vs_3
first=""
for n in $counts; do
  dir="$work/c$n"
  TESSERA_REBUILD_MIB_PER_SEC=$rate "$bin" up --dir "$dir" --sds "$n" --detach --base-port "$base_port" --device-size 2GiB >/dev/null
  export TESSERA_CONFIG="$dir/tessera.toml"
  "$bin" volume create v --size "$((data_mib * 2))MiB" >/dev/null
  uri=$("$bin" volume map v)
  nbdcopy --flush "$work/data" "$uri"
  sleep 2 # usage reports arrive with heartbeats
  lost=$(status_field "[x['used_bytes'] for x in s['sdss'] if x['name']=='sds-1'][0] >> 20")
  kill -9 "$(cat "$dir/sds-1.pid")"
  start=$(date +%s.%N)
  # Wait for the loss to be seen, then for every PG to be healthy again.
  while [ "$(status_field "s['pgs']['healthy_pgs']")" = 256 ]; do sleep 0.05; done
  until [ "$(status_field "s['pgs']['healthy_pgs']")" = 256 ]; do sleep 0.1; done
  end=$(date +%s.%N)
  secs=$(python3 -c "print(f'{$end - $start:.1f}')")
  [ -n "$first" ] || first=$secs
  printf '%-5s %-12s %-14s %-12s %s\n' "$n" "$lost" "$secs" \
    "$(python3 -c "print(f'{$lost / ($end - $start):.1f}')")" "$(python3 -c "print(f'{$first / $secs:.2f}')")"
  "$bin" volume verify v >/dev/null || die "copies differ after the rebuild with $n SDSs"
  "$bin" down --dir "$dir" >/dev/null
  rm -rf "$dir"
  dir=""
done
echo "data ${data_mib} MiB written once; back-fill throttled to ${rate} MiB/s per source device; time from SIGKILL to all PGs healthy"
