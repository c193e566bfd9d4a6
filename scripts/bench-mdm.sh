#!/usr/bin/env bash
# Metadata latency and MDM failover for 1-, 3- and 5-member MDM clusters (3 SDSs each).
# For each mode it starts a fresh local cluster, creates volumes one after another through
# the control client (`examples/mdm_bench.rs latency`) and reports p50/p99 and ops/s. On the
# 3- and 5-member clusters it then SIGKILLs the primary MDM under a loop that creates a
# volume every 20 ms (`mdm_bench failover`) and reports the time from the kill to the first
# successful metadata write, restarting the killed MDM (as a standby, as an operator would)
# and waiting for it to catch up between runs. Not a test: figures depend on the host.
#
#   scripts/bench-mdm.sh
#   BENCH_MDM_MODES="1 3" BENCH_MDM_COUNT=100 BENCH_FAILOVER_RUNS=2 scripts/bench-mdm.sh
#
# Environment:
#   BENCH_MDM_MODES      MDM counts to run (default "1 3 5")
#   BENCH_MDM_COUNT      volumes created for the latency figures (default 200)
#   BENCH_FAILOVER_RUNS  primary kills per multi-MDM cluster (default 3)
#   BENCH_BASE_PORT      first port tried; each cluster takes 15 ports (default 7990)
#   BENCH_KEEP=1         keep the working directory (daemon logs) even on success
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
modes=${BENCH_MDM_MODES:-1 3 5}
count=${BENCH_MDM_COUNT:-200}
runs=${BENCH_FAILOVER_RUNS:-3}
port=${BENCH_BASE_PORT:-7990}
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/tessera
bench=$target/release/examples/mdm_bench
# Longest wait for a restarted MDM to rejoin and catch up.
rejoin_timeout_s=60

die() { echo "bench-mdm.sh: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "missing tool: python3"
for m in $modes; do case "$m" in 1|3|5) ;; *) die "BENCH_MDM_MODES: $m is not 1, 3 or 5" ;; esac; done
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "BENCH_MDM_COUNT must be a positive number"
[[ "$runs" =~ ^[0-9]+$ ]] || die "BENCH_FAILOVER_RUNS must be a number"

# Always build: the figures should be those of the tree as it is.
(cd "$root" && cargo build --release -p tessera --bin tessera --example mdm_bench) </dev/null >&2 \
  || die "cannot build tessera and mdm_bench"

work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-bench-mdm.XXXXXX")
dir=""
succeeded=0
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    "$bin" down --dir "$dir" >/dev/null 2>&1 || true
    # `down` failing must not leak daemons: kill whatever the pid files still name.
    for pidfile in "$dir"/*.pid; do
      [ -e "$pidfile" ] || continue
      kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
  fi
  rm -f "$work"/*/sds-*/disk0.img
  if [ "$succeeded" = 1 ] && [ "${BENCH_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
  else
    echo "bench-mdm.sh: kept $work (daemon logs in */*.log, mdm_bench output in *.out)" >&2
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# First base port from $1 up (in steps of 20) whose 15 ports are free on 127.0.0.1 and on
# the MDMs' own loopback addresses 127.0.0.11-15.
free_base() {
  python3 - "$1" <<'EOF'
import socket, sys
base = int(sys.argv[1])
def free(b):
    for port in range(b, b + 15):
        for ip in ["127.0.0.1"] + [f"127.0.0.{10 + n}" for n in range(1, 6)]:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((ip, port))
                except OSError:
                    return False
    return True
while base + 15 < 65536:
    if free(base):
        print(base)
        sys.exit(0)
    base += 20
sys.exit("no free port range")
EOF
}

val() { sed -n "s/^$1=//p" "$2" | head -n 1; } # key file

# Milliseconds from the kill (unix ms) to the first "become leader id=N" in MDM N's log
# (tracing's UTC timestamps), or "?".
elected_ms() { # log id killed_at_unix_ms
  python3 - "$@" <<'EOF'
import datetime, re, sys
path, node, killed = sys.argv[1], sys.argv[2], int(sys.argv[3] or 0)
ansi = re.compile(r"\x1b\[[0-9;]*m")
try:
    lines = open(path, errors="replace")
except OSError:
    lines = []
for line in lines:
    line = ansi.sub("", line)
    if f"become leader id={node}" not in line:
        continue
    t = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() * 1000
    if t > killed:
        print(f"{t - killed:.0f}")
        break
else:
    print("?")
EOF
}

# Waits until every voter is reachable and holds the same last index (a restarted member
# has caught up), so the next kill measures a failover and not a catch-up.
wait_caught_up() {
  local deadline=$((SECONDS + rejoin_timeout_s))
  until "$bin" --config "$dir/tessera.toml" --json mdm ls 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
voters = [m for m in s["members"] if m["voter"]]
idx = {m["matched_index"] for m in voters}
sys.exit(0 if s["state"] == "normal" and s["leader_id"] is not None and len(idx) == 1 else 1)'; do
    [ "$SECONDS" -lt "$deadline" ] || die "MDMs of $dir did not catch up within ${rejoin_timeout_s}s; see $dir/mdm-*.log"
    sleep 0.2
  done
}

declare -A p50 p99 ops failovers elections failed
details=()
for m in $modes; do
  port=$(free_base "$port") || die "no free port range from $port"
  dir=$work/mdm$m
  echo "bench-mdm.sh: $m MDM(s), 3 SDSs, ports $port..$((port + 14)), in $dir" >&2
  "$bin" up --dir "$dir" --mdm "$m" --sds 3 --device-size 512MiB --base-port "$port" --detach \
    >"$work/up-$m.log" 2>&1 || { cat "$work/up-$m.log" >&2; die "tessera up --mdm $m failed"; }
  cfg=$dir/tessera.toml

  "$bench" latency "$cfg" --count "$count" --prefix lat >"$work/latency-$m.out" \
    || die "latency run on $m MDM(s) failed"
  p50[$m]=$(val p50_ms "$work/latency-$m.out")
  p99[$m]=$(val p99_ms "$work/latency-$m.out")
  ops[$m]=$(val ops_per_sec "$work/latency-$m.out")

  failovers[$m]=""
  elections[$m]=""
  failed[$m]=0
  if [ "$m" -gt 1 ]; then
    for run in $(seq 1 "$runs"); do
      wait_caught_up
      out=$work/failover-$m-$run.out
      if ! "$bench" failover "$cfg" --prefix "fo$run" >"$out" 2>"$out.err"; then
        cat "$out.err" >&2
        failovers[$m]+="${failovers[$m]:+ / }none"
      else
        failovers[$m]+="${failovers[$m]:+ / }$(val failover_ms "$out" | cut -d. -f1)"
      fi
      id=$(val killed_id "$out")
      [ -n "$id" ] || die "failover run $run on $m MDMs named no killed MDM; see $out.err"
      new=$(val new_leader_id "$out")
      e=$(elected_ms "$dir/mdm-$new.log" "$new" "$(val killed_at_unix_ms "$out")")
      elections[$m]+="${elections[$m]:+ / }$e"
      fc=$(val failed_calls "$out")
      failed[$m]=$((failed[$m] + ${fc:-0}))
      details+=("$m MDMs, run $run: killed mdm-$id ($(val killed_role "$out"), call in flight: $(val in_flight_at_kill "$out")),\
 mdm-$new leader after $e ms, first write after $(val failover_ms "$out") ms,\
 longest call $(val longest_call_ms "$out") ms, failed calls $(val failed_calls "$out"),\
 committed-then-retried $(val committed_before_retry "$out")")
      while read -r line; do details+=("    $line"); done < <(grep '^error=' "$out" || true)
      # Bring the killed MDM back as `up` would, so the next run starts from a full cluster.
      # From a subshell, so that it is not this shell's job (no "Killed" notice when a later
      # run kills it) and `down` stops it through its pid file.
      (
        "$bin" --config "$cfg" daemon mdm --dir "$dir/mdm-$id" --id "$id" --listen "$(val killed_address "$out")" \
          --role "$(val killed_role "$out")" --standby >>"$dir/mdm-$id.log" 2>&1 </dev/null &
        echo "$!" >"$dir/mdm-$id.pid"
      )
    done
  fi
  "$bin" down --dir "$dir" >/dev/null
  dir=""
  port=$((port + 20))
done

echo
echo "| mode | create p50 (ms) | p99 (ms) | ops/s | failover to first write (ms) | new leader elected (ms) | failed calls |"
echo "|------|----------------:|---------:|------:|------------------------------|-------------------------|-------------:|"
for m in $modes; do
  if [ "$m" = 1 ]; then fo="n/a"; el="n/a"; nf="n/a"; else fo=${failovers[$m]:-not run}; el=${elections[$m]:-not run}; nf=${failed[$m]}; fi
  printf '| %s_node | %s | %s | %s | %s | %s | %s |\n' "$m" "${p50[$m]}" "${p99[$m]}" "${ops[$m]}" "$fo" "$el" "$nf"
done
echo
echo "$count thin volumes created one after another (after 5 unmeasured). Failover: a volume every 20 ms,"
echo "primary SIGKILLed after 2 s; first write = kill to the first successful create, through ControlClient"
echo "(its retry back-off included); leader elected = kill to 'become leader' in the new primary's log."
echo "$runs run(s) per mode, the killed MDM restarted and caught up between runs."
for line in "${details[@]}"; do echo "  $line"; done
succeeded=1
