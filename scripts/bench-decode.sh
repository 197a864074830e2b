#!/usr/bin/env bash
#
# scripts/bench-decode.sh — slotlake's decoding throughput against pg_recvlogical's.
#
# On one throwaway server (scripts/lib/pg.sh) it creates pgoutput slots, generates a workload of
# inserts, updates and deletes over many tables (1,000,000 changes over 100 tables by default),
# then drains the slots one at a time, over the same transport:
#
#   pg_recvlogical -P pgoutput   the baseline: receives the raw pgoutput stream to /dev/null
#   slotlake tail --discard      receives the same changes and decodes every value into typed
#                                values (each change's JSON line is built, then discarded)
#
# and prints both rates, their ratio (goal: slotlake >= 0.95x pg_recvlogical) and the CPU
# seconds each client used. The server's own work (reading WAL, logical decoding in the WAL
# sender) is the same for both and is not in the CPU column.
#
# Fairness. The first drain after the load is slower than later ones, whichever client does it
# (cold WAL and decoding caches: ~9-10 s against ~5-6 s for pg_recvlogical at the default size),
# and single runs on a 2-core machine vary by tens of percent. So by default an untimed warm-up
# drains a third slot first, and the comparison runs in rounds: each round drains a fresh pair of
# slots (bench_pg_R, bench_sl_R, all created before the load), alternating which client goes
# first. The headline ratio is the median of the rounds' ratios. `--rounds 1 --no-warmup
# --order pg-first` is the plain two-slot run.
#
# Usage: scripts/bench-decode.sh [options]   (see --help)
#
# Environment:
#   CARGO_TARGET_DIR   where slotlake is built (default: <repo>/target); the binary is
#                      $CARGO_TARGET_DIR/release/slotlake
#   SLOTLAKE_BIN       use this slotlake binary and do not build
#   SLOTLAKE_PG_BIN    PostgreSQL binaries (default /usr/lib/postgresql/15/bin)

set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
# shellcheck source=lib/pg.sh
source "$script_dir/lib/pg.sh"
# shellcheck source=lib/workload.sh
source "$script_dir/lib/workload.sh"

transport=unix
changes=1000000
tables=100
batch=1000
rounds=3
order=alternate
warmup=1
timeout_s=1800
min_ratio=
build=1

usage() {
    cat <<USAGE
Usage: scripts/bench-decode.sh [options]

Benchmarks slotlake's pgoutput decoding against pg_recvlogical on a throwaway PostgreSQL server.

Options:
  --transport unix|tcp   how both clients connect (default: $transport)
  --changes N            changes to generate: 80% inserts, 15% updates, 5% deletes (default: $changes)
  --tables N             tables to spread them over (default: $tables)
  --batch N              changes per transaction (default: $batch)
  --rounds N             timed rounds, each on a fresh pair of slots (default: $rounds, at most 20)
  --order alternate|pg-first|slotlake-first
                         which client drains first in each round (default: $order:
                         pg_recvlogical first in odd rounds, slotlake first in even ones)
  --no-warmup            skip the untimed warm-up drain before the rounds
  --min-ratio R          exit with status 3 when the median ratio is below R (e.g. 0.95)
  --timeout SECONDS      give up on a client after this long (default: $timeout_s)
  --no-build             do not run cargo build; use the existing release binary
  -h, --help             this help

Environment: CARGO_TARGET_DIR (default <repo>/target), SLOTLAKE_BIN (a binary to use, no build),
SLOTLAKE_PG_BIN (default /usr/lib/postgresql/15/bin).
USAGE
}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0)); }

while (($#)); do
    case $1 in
        --transport) transport=${2:?--transport needs a value}; shift 2 ;;
        --changes) changes=${2:?--changes needs a value}; shift 2 ;;
        --tables) tables=${2:?--tables needs a value}; shift 2 ;;
        --batch) batch=${2:?--batch needs a value}; shift 2 ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
        --order) order=${2:?--order needs a value}; shift 2 ;;
        --no-warmup) warmup=0; shift ;;
        --min-ratio) min_ratio=${2:?--min-ratio needs a value}; shift 2 ;;
        --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ $transport == unix || $transport == tcp ]] || die "--transport must be unix or tcp"
[[ $order == alternate || $order == pg-first || $order == slotlake-first ]] \
    || die "--order must be alternate, pg-first or slotlake-first"
for v in changes tables batch rounds timeout_s; do
    is_uint "${!v}" || die "--${v%_s} must be a positive integer"
done
changes=$((10#$changes)) tables=$((10#$tables)) batch=$((10#$batch)) rounds=$((10#$rounds))
((tables <= 1000)) || die "--tables must be at most 1000"
((rounds <= 20)) || die "--rounds must be at most 20"
((changes >= 10 * tables)) || die "--changes must be at least 10 per table ($((10 * tables)) for $tables tables)"
[[ -z $min_ratio || $min_ratio =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--min-ratio must be a number"
command -v timeout >/dev/null || die "timeout (coreutils) is needed"
[[ -x $PG_BIN/pg_recvlogical ]] || die "$PG_BIN/pg_recvlogical not found (set SLOTLAKE_PG_BIN)"

# --- slotlake binary ------------------------------------------------------------------------
slotlake=$(bench_slotlake_bin "$build" "$repo_dir") || exit 1

# --- server and workload --------------------------------------------------------------------
PG_USER=bench
PG_DB=bench
say "starting a throwaway PostgreSQL ($PG_BIN)"
# autovacuum off: it would otherwise vacuum the fresh tables while the clients are timed.
pg_start shared_buffers=256MB max_wal_size=4GB autovacuum=off \
    max_replication_slots=$((2 * rounds + 2))
work=$PG_DIR/bench
mkdir -p "$work"

# client_pid: the client being timed, stopped by the EXIT trap on INT/TERM or an error.
client_pid=
on_exit() {
    if [[ -n $client_pid ]]; then
        kill -TERM "$client_pid" 2>/dev/null || true
        wait "$client_pid" 2>/dev/null || true
    fi
    pg_stop
}
trap on_exit EXIT

conn=$(pg_conninfo "$transport")
server_version=$(pg_value "SHOW server_version")

say "creating $tables tables, publication bench, $((2 * rounds + warmup)) slots"
{
    for ((i = 0; i < tables; i++)); do
        printf 'CREATE TABLE t%03d (id bigint PRIMARY KEY, a int, b text, c numeric(12,2), d timestamptz, e boolean);\n' "$i"
    done
    echo "CREATE PUBLICATION bench FOR ALL TABLES;"
    if ((warmup)); then
        echo "SELECT pg_create_logical_replication_slot('bench_warm', 'pgoutput');"
    fi
    for ((r = 1; r <= rounds; r++)); do
        echo "SELECT pg_create_logical_replication_slot('bench_pg_$r', 'pgoutput');"
        echo "SELECT pg_create_logical_replication_slot('bench_sl_$r', 'pgoutput');"
    done
} >"$work/schema.sql"
pg_psql -f "$work/schema.sql" >/dev/null
start_lsn=$(pg_value "SELECT pg_current_wal_insert_lsn()")

write_workload "$tables" "$changes" "$batch" 3 "$work/load.sql"
read -r n_ins n_upd n_del < <(sed -n 's/^-- totals //p' "$work/load.sql")
n_changes=$((n_ins + n_upd + n_del))
((n_changes == changes)) || die "internal: workload has $n_changes changes, not $changes"
n_txns=$(grep -c '^[IUD]' "$work/load.sql")

say "loading $n_changes changes ($n_ins inserts, $n_upd updates, $n_del deletes) in $n_txns transactions"
t0=$(date +%s%N)
pg_psql -f "$work/load.sql" >/dev/null
t1=$(date +%s%N)
# The insert position, not pg_current_wal_lsn() (the write position): with synchronous_commit
# off the last commits may not be written yet. The CHECKPOINT below flushes them, and writes WAL
# past end_lsn, which lets pg_recvlogical --endpos see the end.
end_lsn=$(pg_value "SELECT pg_current_wal_insert_lsn()")
wal_bytes=$(pg_value "SELECT pg_wal_lsn_diff('$end_lsn', '$start_lsn')::bigint")
rows=$(pg_value "SELECT $(for ((i = 0; i < tables; i++)); do printf '(SELECT count(*) FROM t%03d) + ' "$i"; done) 0")
((rows == n_ins - n_del)) || die "the tables hold $rows rows, expected $((n_ins - n_del))"
pg_psql -c CHECKPOINT >/dev/null
wal_mib=$(awk -v b="$wal_bytes" 'BEGIN { printf "%.0f", b / 1048576 }')
say "loaded in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')s; $wal_mib MiB of WAL; end LSN $end_lsn"

# --- the clients ----------------------------------------------------------------------------
# children_cpu — sets CPU_U and CPU_S to the user and system CPU seconds of all waited-for
# children so far (the second line of bash's `times`). `times` must run in this shell: in a
# subshell (pipeline, $(...), <(...)) its children counters start from zero.
children_cpu() {
    times >"$work/times"
    read -r CPU_U CPU_S < <(awk 'function secs(v, m) { m = v; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", v); sub(/s$/, "", v); return m * 60 + v }
        NR == 2 { printf "%.3f %.3f\n", secs($1), secs($2) }' "$work/times")
}

# run_timed NAME CMD... — runs CMD under timeout as a background job and waits for it (so that
# INT/TERM end the script at once; the EXIT trap then stops the job). Sets WALL (seconds, from
# nanosecond clocks) and USER_S, SYS_S (the CPU CMD used). Output in $work/NAME.{out,err}.
run_timed() {
    local name=$1 t_start t_end rc=0 u0 s0
    shift
    children_cpu
    u0=$CPU_U s0=$CPU_S
    t_start=$(date +%s%N)
    timeout "$timeout_s" "$@" >"$work/$name.out" 2>"$work/$name.err" &
    client_pid=$!
    wait "$client_pid" || rc=$?
    t_end=$(date +%s%N)
    client_pid=
    if ((rc != 0)); then
        tail -n 20 "$work/$name.err" >&2 || true
        if ((rc == 124)); then die "$name did not finish within ${timeout_s}s"; fi
        die "$name failed (exit status $rc; its stderr is above)"
    fi
    children_cpu
    WALL=$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    USER_S=$(awk -v a="$u0" -v b="$CPU_U" 'BEGIN { printf "%.3f", b - a }')
    SYS_S=$(awk -v a="$s0" -v b="$CPU_S" 'BEGIN { printf "%.3f", b - a }')
}

# run_pg_recvlogical SLOT — drains SLOT to end_lsn with pg_recvlogical.
run_pg_recvlogical() {
    local slot=$1 left
    run_timed "$slot" "$PG_BIN/pg_recvlogical" -d "$conn" --slot "$slot" --start \
        -P pgoutput -o proto_version=1 -o publication_names=bench \
        --endpos "$end_lsn" --no-loop -f /dev/null
    # pg_recvlogical cannot count what it received; it confirms what it wrote on exit, so
    # nothing may be left in its slot.
    left=$(pg_value "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('$slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'bench')")
    [[ $left == 0 ]] || die "pg_recvlogical stopped early: $left messages are left in slot $slot"
}

# run_slotlake SLOT — decodes exactly n_changes changes from SLOT with slotlake tail --discard.
run_slotlake() {
    local slot=$1 decoded
    run_timed "$slot" "$slotlake" --log-level info --log-format json tail --source "$conn" \
        --slot "$slot" --publication bench --discard --limit "$n_changes" --status-interval 10s
    # tail logs {"fields":{"message":"tail finished","changes":N,...},...} to stderr.
    decoded=$(sed -n 's/.*"message":"tail finished".*"changes":\([0-9]*\).*/\1/p' "$work/$slot.err" | tail -n 1)
    [[ $decoded == "$n_changes" ]] || die "slotlake decoded ${decoded:-?} changes from $slot, expected $n_changes"
}

# cpu_busy — prints how busy the CPUs were (percent, all cores) over one second, from
# /proc/stat; "?" where there is none. Our server is idle at this point, so this is other work,
# which on a 2-core machine skews the numbers badly.
cpu_busy() {
    local _c u1 n1 s1 i1 w1 q1 sq1 st1 u2 n2 s2 i2 w2 q2 sq2 st2 rest
    [[ -r /proc/stat ]] || { echo "?"; return; }
    read -r _c u1 n1 s1 i1 w1 q1 sq1 st1 rest </proc/stat
    sleep 1
    read -r _c u2 n2 s2 i2 w2 q2 sq2 st2 rest </proc/stat
    awk -v busy=$(((u2 + n2 + s2 + q2 + sq2 + st2) - (u1 + n1 + s1 + q1 + sq1 + st1))) \
        -v idle=$(((i2 + w2) - (i1 + w1))) 'BEGIN { printf "%.0f\n", busy + idle ? 100 * busy / (busy + idle) : 0 }'
}
busy=$(cpu_busy)
if [[ $busy != "?" ]] && ((busy > 10)); then
    say "warning: the CPUs were ${busy}% busy with other work just before the runs; the numbers will be skewed"
fi

if ((warmup)); then
    say "warm-up: draining bench_warm with pg_recvlogical (untimed)"
    run_pg_recvlogical bench_warm
    say "  took ${WALL}s"
fi

: >"$work/results"
for ((r = 1; r <= rounds; r++)); do
    if [[ $order == pg-first ]] || [[ $order == alternate && $((r % 2)) == 1 ]]; then
        first=pg tools=(pg sl)
    else
        first=sl tools=(sl pg)
    fi
    for tool in "${tools[@]}"; do
        if [[ $tool == pg ]]; then
            say "round $r/$rounds: pg_recvlogical drains bench_pg_$r ($transport)"
            run_pg_recvlogical "bench_pg_$r"
            name=pg_recvlogical
        else
            say "round $r/$rounds: slotlake tail --discard drains bench_sl_$r ($transport)"
            run_slotlake "bench_sl_$r"
            name=slotlake
        fi
        say "  ${WALL}s, CPU ${USER_S}s user + ${SYS_S}s sys"
        printf '%s %s %s %s %s %s\n' "$r" "$name" "$first" "$WALL" "$USER_S" "$SYS_S" >>"$work/results"
    done
done

# --- report ---------------------------------------------------------------------------------
awk -v n="$n_changes" -v ver="$server_version" -v tr="$transport" -v tables="$tables" \
    -v txns="$n_txns" -v wal="$wal_mib" -v rounds="$rounds" -v warmup="$warmup" \
    -v busy="$busy" -v ratio_file="$work/ratio" '
function median(a, k,    i, j, t) {
    for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
function row(label, tool, w, u, s) {
    printf "%-9s %-15s %9d %8.3f %10.0f %7.2f %7.2f %7.2f\n", label, tool, n, w, n / w, u + s, u, s
}
{
    r = $1; tool = $2; first[r] = $3; w[r, tool] = $4; u[r, tool] = $5; s[r, tool] = $6
}
END {
    printf "PostgreSQL %s; %d changes over %d tables in %d transactions (%s MiB WAL); transport %s; %d round(s)%s; CPUs %s%% busy with other work before\n\n", ver, n, tables, txns, wal, tr, rounds, (warmup ? " after an untimed warm-up" : ""), busy
    printf "%-9s %-15s %9s %8s %10s %7s %7s %7s\n", "round", "tool", "changes", "seconds", "changes/s", "CPU s", "user s", "sys s"
    for (r = 1; r <= rounds; r++) {
        label = r (first[r] == "pg" ? " pg1st" : " sl1st")
        row(label, "pg_recvlogical", w[r, "pg_recvlogical"], u[r, "pg_recvlogical"], s[r, "pg_recvlogical"])
        row(label, "slotlake", w[r, "slotlake"], u[r, "slotlake"], s[r, "slotlake"])
        ratio[r] = w[r, "pg_recvlogical"] / w[r, "slotlake"]
        ratios = ratios sprintf(" %.2f", ratio[r])
        for (t = 1; t <= 2; t++) {
            tool = t == 1 ? "pg_recvlogical" : "slotlake"
            mw[tool, r] = w[r, tool]; mu[tool, r] = u[r, tool]; ms[tool, r] = s[r, tool]
        }
    }
    if (rounds > 1) {
        for (t = 1; t <= 2; t++) {
            tool = t == 1 ? "pg_recvlogical" : "slotlake"
            for (r = 1; r <= rounds; r++) { a[r] = mw[tool, r]; b[r] = mu[tool, r]; c[r] = ms[tool, r] }
            row("median", tool, median(a, rounds), median(b, rounds), median(c, rounds))
            if (tool == "slotlake") { slw = median(a, rounds) }
            for (r = 1; r <= rounds; r++) cpu[r] = mu[tool, r] + ms[tool, r]
            mcpu[tool] = median(cpu, rounds)
        }
    } else {
        mcpu["slotlake"] = u[1, "slotlake"] + s[1, "slotlake"]
    }
    m = median(ratio, rounds)
    printf "\nratio slotlake/pg_recvlogical = %.2f (goal >= 0.95)%s\n", m, (rounds > 1 ? ";  per round:" ratios : "")
    printf "slotlake CPU: %.2f s for %d changes (%.2f us per change)%s\n", mcpu["slotlake"], n, mcpu["slotlake"] * 1e6 / n, (rounds > 1 ? ", median" : "")
    printf "%.6f\n", m > ratio_file
}' "$work/results"

if [[ -n $min_ratio ]]; then
    if awk -v m="$(cat "$work/ratio")" -v min="$min_ratio" 'BEGIN { exit !(m < min) }'; then
        say "the median ratio is below --min-ratio $min_ratio"
        exit 3
    fi
fi
