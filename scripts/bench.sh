#!/usr/bin/env bash
# Benchmarks a local Tessera cluster (MDM, 3 SDSs holding two copies of every extent, SDC
# exporting NBD on a unix socket) against a baseline measured in the same run on the same
# machine: `nbdkit file` serving a plain file of the same size, also over a unix socket.
# Both sides get the same fio jobs (ioengine=nbd); the table prints tessera/nbdkit ratios.
# Not a test: absolute numbers vary with the host, the ratios are what to compare.
#
#   scripts/bench.sh           # full run: 15 s per job, 1 GiB working set (~4 minutes)
#   scripts/bench.sh --quick   # smoke run: 3 s per job, 256 MiB (~1 minute)
#
# Environment:
#   BENCH_RUNTIME    seconds per timed job (default 15, --quick 3)
#   BENCH_SIZE       volume / baseline file size, whole MiB (default 1GiB, --quick 256MiB)
#   BENCH_DIR        working directory; must not exist or be empty (default: mktemp -d).
#                    A directory given here is kept; the default one is removed on success
#                    and kept (with the daemons' logs) on failure.
#   BENCH_BASE_PORT  MDM port; SDS n listens on base+10+n (default 7910)
#   BENCH_KEEP=1     keep the working directory even on success
#   TESSERA_BIN      binary to run (default: target/release/tessera, built if missing)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$quick" = 1 ]; then
  runtime=${BENCH_RUNTIME:-3}; size_text=${BENCH_SIZE:-256MiB}; ramp=1
else
  runtime=${BENCH_RUNTIME:-15}; size_text=${BENCH_SIZE:-1GiB}; ramp=2
fi
base_port=${BENCH_BASE_PORT:-7910}

die() { echo "bench.sh: $*" >&2; exit 1; }

# --- Tools: install nothing, name what is missing. ----------------------------------------
missing=()
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || die "missing tool(s): ${missing[*]} (install them, e.g. apt-get install ${missing[*]})"
fio --enghelp=nbd >/dev/null 2>&1 || die "fio ($(fio --version)) has no nbd ioengine; install a fio built with libnbd"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit has no file plugin (nbdkit-plugin-file / nbdkit-basic-plugins)"

[[ "$runtime" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a whole number of seconds, got '$runtime'"
size_bytes=$(python3 - "$size_text" <<'EOF'
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", sys.argv[1], re.I)
if not m:
    sys.exit(f"BENCH_SIZE: cannot parse {sys.argv[1]!r} (e.g. 1GiB, 512MiB)")
n = int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))
if n < 64 << 20 or n % (1 << 20):
    sys.exit(f"BENCH_SIZE: {sys.argv[1]!r} must be a whole number of MiB, at least 64MiB")
print(n)
EOF
) || die "invalid BENCH_SIZE"
size_mib=$((size_bytes >> 20))
# Each SDS holds 2/3 of the data plus the pool's spare share; a sparse 2x-size device per
# SDS leaves ample room and costs disk only where extents are written.
device_mib=$((size_mib * 2 > 4096 ? size_mib * 2 : 4096))

# --- Binary. ------------------------------------------------------------------------------
tessera=${TESSERA_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/tessera}
if [ ! -x "$tessera" ]; then
  command -v cargo >/dev/null 2>&1 || die "$tessera is missing and cargo is not installed to build it"
  echo "bench.sh: $tessera is missing; building it (cargo build --release -p tessera)" >&2
  cargo build --release -p tessera --manifest-path "$root/Cargo.toml"
  [ -x "$tessera" ] || die "built, but $tessera still does not exist (CARGO_TARGET_DIR?)"
fi

# --- Working directory and teardown. ------------------------------------------------------
if [ -n "${BENCH_DIR:-}" ]; then
  dir=$BENCH_DIR; own_dir=0
  mkdir -p "$dir"
  [ -z "$(ls -A "$dir")" ] || die "BENCH_DIR $dir is not empty (a previous run's cluster?)"
  dir=$(cd "$dir" && pwd)
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/tessera-bench.XXXXXX"); own_dir=1
fi
cluster=$dir/cluster
results=$dir/results
mkdir -p "$results"
nbdkit_pid=
succeeded=0

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$nbdkit_pid" ]; then
    kill "$nbdkit_pid" 2>/dev/null || true
    wait "$nbdkit_pid" 2>/dev/null || true
  fi
  if [ -d "$cluster" ]; then
    "$tessera" down --dir "$cluster" >/dev/null 2>&1 || true
    # `down` failing must not leak daemons: they run in their own sessions, so Ctrl-C
    # never reaches them. Kill whatever the pid files still name.
    for pidfile in "$cluster"/*.pid; do
      [ -e "$pidfile" ] || continue
      kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
  fi
  if [ "$own_dir" = 1 ] && [ "${BENCH_KEEP:-0}" != 1 ] && { [ "$succeeded" = 1 ] || [ ! -d "$cluster" ]; }; then
    rm -rf "$dir"
  else
    # The images are the bulk of the directory and say nothing after the run.
    rm -f "$cluster"/sds-*/disk0.img "$dir/baseline.img"
    echo "bench.sh: kept $dir (daemon logs in $cluster/*.log, fio JSON in $results)" >&2
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Start both servers. ------------------------------------------------------------------
python3 - "$base_port" <<'EOF' || die "pick another range with BENCH_BASE_PORT"
import socket, sys
base = int(sys.argv[1])
for port in [base] + [base + 10 + n for n in (1, 2, 3)]:
    with socket.socket() as s:
        # As the daemons do (tokio sets it): TIME_WAIT left by a previous run is no conflict.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            sys.exit(f"bench.sh: port {port} on 127.0.0.1 is taken ({e.strerror})")
EOF
echo "bench.sh: starting a 3-SDS cluster in $cluster (ports $base_port..$((base_port + 13)))" >&2
"$tessera" up --dir "$cluster" --sds 3 --detach --base-port "$base_port" --device-size "${device_mib}MiB" >&2 \
  || die "tessera up failed; logs in $cluster"
export TESSERA_CONFIG=$cluster/tessera.toml
"$tessera" volume create bench1 --size "$size_bytes" >&2
tessera_uri=$("$tessera" volume map bench1)
[[ "$tessera_uri" == nbd+unix://* ]] || die "unexpected URI from volume map: '$tessera_uri'"

# Same filesystem as the SDS devices; written in full by the same fill job below.
truncate -s "$size_bytes" "$dir/baseline.img"
nbdkit --exit-with-parent -f -U "$dir/nbdkit.sock" -P "$dir/nbdkit.pid" file file="$dir/baseline.img" \
  2>"$dir/nbdkit.log" &
nbdkit_pid=$!
for _ in $(seq 100); do [ -S "$dir/nbdkit.sock" ] && break; sleep 0.05; done
[ -S "$dir/nbdkit.sock" ] || die "nbdkit did not create $dir/nbdkit.sock; see $dir/nbdkit.log"
nbdkit_uri="nbd+unix:///?socket=$dir/nbdkit.sock"

roles=(mdm-1 sds-1 sds-2 sds-3 sdc-1)
declare -A role_pid
for role in "${roles[@]}"; do
  role_pid[$role]=$(cat "$cluster/$role.pid")
done

cluster_alive() {
  local role dead=0
  for role in "${roles[@]}"; do
    if ! kill -0 "${role_pid[$role]}" 2>/dev/null; then
      echo "bench.sh: $role (pid ${role_pid[$role]}) has exited; last lines of $cluster/$role.log:" >&2
      tail -n 20 "$cluster/$role.log" >&2 || true
      dead=1
    fi
  done
  return "$dead"
}

# CPU time (clock ticks, user+system) of each process, one "name ticks" line each.
cpu_ticks() { # name=pid...
  local entry stat
  for entry in "$@"; do
    read -r stat <"/proc/${entry#*=}/stat" || continue
    # Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    set -- ${stat##*) }
    echo "${entry%%=*} $(( ${12} + ${13} ))"
  done
}

# --- Jobs. --------------------------------------------------------------------------------
# name rw bs iodepth timed(1)/once(0) [extra fio option]
# The durable jobs flush as a database does: after every write at QD1 (--fsync=1), after
# every 32 at QD32, and once at the end of a sequential write. For them "IOPS" counts the
# writes, each of which was made durable on both copies by the flush that followed.
jobs=(
  "fill-seqwrite-1m-qd8 write 1m 8 0"
  "randread-4k-qd1 randread 4k 1 1"
  "randread-4k-qd32 randread 4k 32 1"
  "randwrite-4k-qd1 randwrite 4k 1 1"
  "randwrite-4k-qd32 randwrite 4k 32 1"
  "seqread-1m-qd8 read 1m 8 1"
  "seqwrite-1m-qd8 write 1m 8 1"
  "durable-randwrite-4k-qd1 randwrite 4k 1 1 --fsync=1"
  "durable-randwrite-4k-qd32 randwrite 4k 32 1 --fsync=32"
  "durable-seqwrite-1m-qd8 write 1m 8 0 --end_fsync=1"
)

run_fio() { # target uri name rw bs iodepth timed [extra]
  local target=$1 uri=$2 name=$3 rw=$4 bs=$5 iodepth=$6 timed=$7 extra=${8:-}
  local args=(--name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$iodepth"
              --size="$size_bytes" --group_reporting --output-format=json
              --output="$results/$target-$name.json")
  if [ "$timed" = 1 ]; then
    args+=(--time_based --runtime="$runtime" --ramp_time="$ramp")
  else
    args+=(--end_fsync=1)   # the fill is durable before anything reads it
  fi
  [ -z "$extra" ] || args+=("$extra")
  local procs=()
  if [ "$target" = tessera ]; then
    local role
    for role in "${roles[@]}"; do procs+=("$role=${role_pid[$role]}"); done
  else
    procs+=("nbdkit=$nbdkit_pid")
  fi
  local t0 t1
  cpu_ticks "${procs[@]}" >"$results/$target-$name.cpu0"
  t0=$(date +%s.%N)
  if ! fio "${args[@]}" 2>"$results/$target-$name.err"; then
    cat "$results/$target-$name.err" >&2
    [ "$target" != tessera ] || cluster_alive || true
    die "fio $name against $target failed"
  fi
  t1=$(date +%s.%N)
  cpu_ticks "${procs[@]}" >"$results/$target-$name.cpu1"
  echo "$t0 $t1" >"$results/$target-$name.wall"
}

echo "bench.sh: ${#jobs[@]} jobs x 2 targets, ${runtime}s each (+${ramp}s ramp), size ${size_mib}MiB" >&2
for job in "${jobs[@]}"; do
  read -r name rw bs iodepth timed extra <<<"$job"
  for target in tessera nbdkit; do
    uri=$tessera_uri; [ "$target" = tessera ] || uri=$nbdkit_uri
    printf 'bench.sh: %-26s %-8s\n' "$name" "$target" >&2
    run_fio "$target" "$uri" "$name" "$rw" "$bs" "$iodepth" "$timed" "${extra:-}"
  done
  cluster_alive || die "the cluster lost a daemon during $name"
done

# Peak memory at the end of the run, before teardown.
for role in "${roles[@]}"; do
  echo "$role ${role_pid[$role]} $(awk '/^VmHWM/ {print $2} ' "/proc/${role_pid[$role]}/status") $(awk '/^VmRSS/ {print $2}' "/proc/${role_pid[$role]}/status")"
done >"$results/memory.txt"
echo "nbdkit $nbdkit_pid $(awk '/^VmHWM/ {print $2}' "/proc/$nbdkit_pid/status") $(awk '/^VmRSS/ {print $2}' "/proc/$nbdkit_pid/status")" \
  >>"$results/memory.txt"

# --- Report. ------------------------------------------------------------------------------
rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- 2>/dev/null || rev="$rev+dirty"
python3 - "$results" "$(getconf CLK_TCK)" "${roles[*]}" "${jobs[@]}" <<EOF
import json, os, sys
results, clk_tck, roles, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]

def fio(target, name):
    j = json.load(open(os.path.join(results, f"{target}-{name}.json")))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    us = lambda k: pct.get(k, 0) / 1000
    return dict(iops=side["iops"], mibs=side["bw_bytes"] / 2**20, p50=us("50.000000"),
                p99=us("99.000000"), fio_cpu=j["usr_cpu"] + j["sys_cpu"])

def cpu(target, name):
    read = lambda ext: dict(l.split() for l in open(os.path.join(results, f"{target}-{name}.{ext}")))
    before, after = read("cpu0"), read("cpu1")
    t0, t1 = map(float, open(os.path.join(results, f"{target}-{name}.wall")).read().split())
    return {k: 100 * (int(after[k]) - int(before[k])) / clk_tck / (t1 - t0) for k in after if k in before}

print(f"# tessera $rev, ${size_mib} MiB per target, ${runtime} s per timed job after ${ramp} s ramp")
print()
head = ("workload", "tessera IOPS", "MiB/s", "p50 us", "p99 us", "nbdkit IOPS", "MiB/s", "p50 us", "p99 us", "ratio")
rows = []
for job in jobs:
    name = job.split()[0]
    t, n = fio("tessera", name), fio("nbdkit", name)
    ratio = t["iops"] / n["iops"] if n["iops"] else float("nan")
    rows.append((name, f"{t['iops']:.0f}", f"{t['mibs']:.1f}", f"{t['p50']:.0f}", f"{t['p99']:.0f}",
                 f"{n['iops']:.0f}", f"{n['mibs']:.1f}", f"{n['p50']:.0f}", f"{n['p99']:.0f}", f"{ratio:.2f}"))
widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
print(line(head))
print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
for r in rows:
    print(line(r))
print()
print("ratio = tessera IOPS / nbdkit IOPS (same as the MiB/s ratio); latencies are fio completion latency.")
print()
print("CPU during each job, % of one core over the job's wall time (incl. ramp); $(nproc) cores = $(( $(nproc) * 100 ))%.")
print("Left: the Tessera run (its five daemons + fio); right: the nbdkit run (nbdkit + fio).")
print()
head = ("workload", *roles, "fio", "tessera total", "nbdkit", "fio", "nbdkit total")
rows = []
for job in jobs:
    name = job.split()[0]
    tc, nc = cpu("tessera", name), cpu("nbdkit", name)
    tf, nf = fio("tessera", name)["fio_cpu"], fio("nbdkit", name)["fio_cpu"]
    rows.append((name, *(f"{tc.get(r, 0):.0f}" for r in roles), f"{tf:.0f}", f"{sum(tc.values()) + tf:.0f}",
                 f"{nc.get('nbdkit', 0):.0f}", f"{nf:.0f}", f"{nc.get('nbdkit', 0) + nf:.0f}"))
widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
print(line(head))
print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
for r in rows:
    print(line(r))
print()
print("Memory at the end of the run (VmHWM = peak RSS):")
print()
print("| process | pid | VmHWM MiB | VmRSS MiB |")
print("|---------|----:|----------:|----------:|")
for l in open(os.path.join(results, "memory.txt")):
    role, pid, hwm, rss = l.split()
    print(f"| {role} | {pid} | {int(hwm) / 1024:.1f} | {int(rss) / 1024:.1f} |")
EOF

grep -iE ' (WARN|ERROR) ' "$cluster"/*.log >"$results/daemon-warnings.txt" 2>/dev/null || true
if [ -s "$results/daemon-warnings.txt" ]; then
  echo
  echo "Daemon warnings/errors during the run ($(wc -l <"$results/daemon-warnings.txt") lines; first 10):"
  head -n 10 "$results/daemon-warnings.txt"
fi
succeeded=1
