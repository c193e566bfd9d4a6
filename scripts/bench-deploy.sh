#!/usr/bin/env bash
# Deployment from node attributes, timed: starts `tessera up --sds 0` (an MDM, no storage),
# then N agents at once, each on its own loopback address with one blank 1 GiB loop device
# (single global pool), and reports how long until every device is in service and the pool
# is placed. It then writes a volume, adds one more agent and times the rebalance onto it,
# and times `tessera node remove` (drain, remove, forget) of one node. The baseline, taken in
# the same run, is the same layout made by hand: `sds add`, `device add` and an SDS process
# per node, as an operator (or the old framework) would. Not a test: figures depend on the
# host.
#
#   scripts/bench-deploy.sh
#   BENCH_AGENTS=8 scripts/bench-deploy.sh
#
# Environment:
#   BENCH_AGENTS       agents (default 16)
#   BENCH_VOLUME_MIB   data written before the rebalance and the removal (default 256)
#   BENCH_BASE_PORT    first port of the cluster (default 7940)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
agents=${BENCH_AGENTS:-16}
volume_mib=${BENCH_VOLUME_MIB:-256}
port=${BENCH_BASE_PORT:-7940}
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/tessera

die() { echo "bench-deploy.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (loop devices)"
[[ "$agents" =~ ^[1-9][0-9]*$ ]] && [ "$agents" -ge 3 ] && [ "$agents" -le 60 ] || die "BENCH_AGENTS must be 3..60"
for t in losetup nbdcopy python3; do command -v "$t" >/dev/null || die "missing tool: $t (scripts/install-deps.sh)"; done

(cd "$root" && cargo build --release -p tessera --bin tessera) </dev/null >&2 || die "cannot build tessera"

work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-bench-deploy.XXXXXX")
loops=()
dirs=()
teardown() {
  trap - EXIT INT TERM
  for d in "${dirs[@]}"; do "$bin" down --dir "$d" >/dev/null 2>&1 || true; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap teardown EXIT INT TERM

now() { python3 -c 'import time; print(time.monotonic())'; }
elapsed() { python3 -c "print(f'{$(now) - $1:.2f}')"; }
# Prints ok when the Python expression CHECK holds, with `device ls --json` as d and
# `cluster status --json` as s.
holds() {
  python3 - "$1" <<'PY' 2>/dev/null | grep -q ok
import json, subprocess, sys
t = lambda *a: json.loads(subprocess.run(["tessera", "--json", *a], capture_output=True, check=True, text=True).stdout)
d, s = t("device", "ls"), t("cluster", "status")
print("ok" if eval(sys.argv[1]) else "no")
PY
}
wait_until() {
  local what=$1 check=$2 deadline=$(( $(date +%s) + 300 ))
  until holds "$check"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.2
  done
}
export PATH="$target/release:$PATH"

# Attaches a fresh 1 GiB loop device; sets $loop (not echoed: a command substitution would
# run in a subshell and lose the record teardown needs).
new_loop() {
  local img="$work/disk$1.img"
  truncate -s 1G "$img"
  loop=$(losetup -f --show "$img")
  loops+=("$loop")
}

# --- baseline: the same layout by hand -----------------------------------------------------
base="$work/manual"; dirs+=("$base")
"$bin" up --dir "$base" --sds 0 --base-port "$port" --plugin-socket "$base/plugin.sock" --detach >/dev/null
export TESSERA_CONFIG="$base/tessera.toml"
"$bin" pd create default >/dev/null
"$bin" pool create default --pd default >/dev/null
start=$(now)
for n in $(seq 1 "$agents"); do
  new_loop "m$n"; l=$loop
  addr="127.0.1.$n:$((port + 20))"
  "$bin" sds add "m$n" --pd default --address "$addr" >/dev/null
  "$bin" device add --sds "m$n" --pool default --path "$l" >/dev/null
  ( setsid "$bin" --config "$TESSERA_CONFIG" daemon sds --name "m$n" --listen "$addr" >"$base/m$n.log" 2>&1 & echo $! >"$base/sds-m$n.pid" )
done
wait_until "the manual layout" "sum(x['state']=='Normal' for x in d)==$agents and s['pgs']['unplaced_pgs']==0"
manual_s=$(elapsed "$start")
"$bin" down --dir "$base" >/dev/null
for l in "${loops[@]}"; do losetup -d "$l"; done; loops=()

# --- agents -------------------------------------------------------------------------------
c="$work/c"; dirs+=("$c")
"$bin" up --dir "$c" --sds 0 --base-port "$((port + 40))" --plugin-socket "$c/plugin.sock" --detach >/dev/null
export TESSERA_CONFIG="$c/tessera.toml"
start=$(now)
for n in $(seq 1 "$agents"); do
  new_loop "a$n"; l=$loop; d="$work/n$n"; dirs+=("$d"); mkdir -p "$d/attributes"
  "$bin" agent --dir "$d" --name "n$n" --address "127.0.2.$n" --attributes-dir "$d/attributes" \
    --disk-candidates "$l" --sds-base-port "$((port + 60))" --no-sdc --detach >/dev/null &
done
wait
wait_until "$agents agents" "sum(x['state']=='Normal' for x in d)==$agents and s['pgs']['unplaced_pgs']==0"
agents_s=$(elapsed "$start")

"$bin" volume create bench --size "${volume_mib}MiB" >/dev/null
uri=$("$bin" volume map bench)
head -c "$((volume_mib << 20))" /dev/urandom >"$work/data"
nbdcopy "$work/data" "$uri"

n=$((agents + 1)); new_loop "a$n"; l=$loop; d="$work/n$n"; dirs+=("$d"); mkdir -p "$d/attributes"
start=$(now)
"$bin" agent --dir "$d" --name "n$n" --address "127.0.2.$n" --attributes-dir "$d/attributes" \
  --disk-candidates "$l" --sds-base-port "$((port + 60))" --no-sdc --detach >/dev/null
sleep 1
# Moves go in batches: done when nothing re-mirrors on two looks 2 s apart.
settled="any(x['node']=='n$n' and x['state']=='Normal' for x in d) and s['pgs']['degraded_pgs']==0 and s['rebuild']['pgs_rebuilding']==0"
while :; do
  wait_until "the rebalance onto n$n" "$settled"
  join_s=$(elapsed "$start")
  sleep 2
  holds "$settled" && break
done

start=$(now)
"$bin" node remove n1 --timeout-secs 600 >/dev/null
remove_s=$(elapsed "$start")
nbdcopy "$uri" "$work/back"
cmp -s "$work/data" "$work/back" || die "the volume's data changed"

echo
echo "deployment of $agents nodes (1 GiB loop device each), same host, same run"
printf '  by hand (sds add, device add, SDS process per node): %6s s\n' "$manual_s"
printf '  %2d agents started at once, to all devices in service: %6s s  (ratio %s)\n' "$agents" "$agents_s" \
  "$(python3 -c "print(f'{$agents_s/$manual_s:.2f}')")"
printf '  one more agent, to its device in service and PGs healthy: %6s s\n' "$join_s"
printf '  node remove with %d MiB in the pool (drain, remove, forget): %6s s\n' "$volume_mib" "$remove_s"
