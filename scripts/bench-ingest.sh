#!/usr/bin/env bash
#
# scripts/bench-ingest.sh — slotlake run's end-to-end ingest rate, peak memory and files written,
# against pg_recvlogical draining a twin slot of the same changes.
#
# Each scenario runs on its own throwaway server (scripts/lib/pg.sh) with fresh slots. Two
# pgoutput slots (plus an untimed warm-up slot) are created together before the load, the load
# runs, a row is inserted into a `marker` table and the WAL insert position after it is the end.
# Then, one after the other:
#
#   pg_recvlogical -P pgoutput   the baseline: drains its slot to /dev/null up to the end (--endpos)
#   slotlake run --stop-at       streams its slot into Delta change logs up to the end and exits
#                                once everything before it is committed in the lake and confirmed
#                                (checked afterwards); timed from its start to its exit
#
# Scenarios (sizes divided by 10 with --quick):
#
#   a  1,000,000 changes over 100 tables    -> file://   goal: slotlake >= 0.8x pg_recvlogical
#   b  the same                             -> s3:// (moto on loopback, from scripts/lib/venv.sh)
#   c  1,000,000 changes over 5,000 tables  -> file://   goal: peak RSS <= 512 MiB
#   d  one 5,000,000-row transaction in one table, --memory-budget 128MiB -> file://
#                                                        goal: peak RSS < 256 MiB
#
# The changes of a-c are 80% inserts, 15% updates, 5% deletes in transactions of at most --batch
# rows (the workload of scripts/bench-decode.sh). Peak RSS is GNU time's maximum resident set
# size of each client, CPU its user + system time (also from GNU time). Files are the *.parquet
# files in the sink for file:// (checked against the files_written slotlake logs when it stops),
# and that number for s3://.
#
# The first drain after a load is slower than later ones whoever does it (cold caches), so an
# untimed pg_recvlogical drain of a third slot goes first unless --no-warmup.
#
# With --rounds N, each scenario creates N pairs of twin slots and drains them pair by pair,
# alternating which client goes first, each slotlake run into a sink of its own (deleting the
# last round's files first would tax this round's: ext4 walks the inodes it freed moments ago
# when it allocates new ones). Every round's ratio is printed, and the goal is judged on their
# median: single runs on a shared host move by ±20 %.
#
# Usage: scripts/bench-ingest.sh [options]   (see --help)
#
# Environment:
#   CARGO_TARGET_DIR   where slotlake is built (default: <repo>/target); the binary is
#                      $CARGO_TARGET_DIR/release/slotlake
#   SLOTLAKE_BIN       use this slotlake binary and do not build
#   SLOTLAKE_PG_BIN    PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   SLOTLAKE_VENV      the Python venv with moto (default <repo>/.venv; see scripts/lib/venv.sh)

set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
# shellcheck source=lib/pg.sh
source "$script_dir/lib/pg.sh"
# shellcheck source=lib/workload.sh
source "$script_dir/lib/workload.sh"

scenarios=a,b,c,d
quick=0
batch=1000
order=pg-first
warmup=1
timeout_s=1800
check=0
build=1
rounds=1

usage() {
    cat <<USAGE
Usage: scripts/bench-ingest.sh [options]

Benchmarks slotlake run (changes into Delta change logs) against pg_recvlogical on throwaway
PostgreSQL servers, one per scenario.

Options:
  --scenarios LIST       comma-separated, any of (default: $scenarios):
                           a  1,000,000 changes over 100 tables -> file://
                           b  1,000,000 changes over 100 tables -> s3:// (moto on loopback)
                           c  1,000,000 changes over 5,000 tables -> file://
                           d  one 5,000,000-row transaction, --memory-budget 128MiB -> file://
  --quick                divide the numbers of changes by 10 (a smoke run)
  --batch N              changes per transaction in a-c (default: $batch)
  --order pg-first|slotlake-first
                         which client drains first (default: $order)
  --no-warmup            skip the untimed pg_recvlogical warm-up drain in each scenario
  --rounds N             drain N pairs of twin slots per scenario, alternating which client
                         goes first; goals judged on the median ratio (default: $rounds)
  --check                exit with status 3 when a goal is missed (a: ratio >= 0.8;
                         c: peak RSS <= 512 MiB; d: peak RSS < 256 MiB)
  --timeout SECONDS      give up on a client after this long (default: $timeout_s)
  --no-build             do not run cargo build; use the existing release binary
  -h, --help             this help

Environment: CARGO_TARGET_DIR (default <repo>/target), SLOTLAKE_BIN (a binary to use, no build),
SLOTLAKE_PG_BIN (default /usr/lib/postgresql/15/bin), SLOTLAKE_VENV (default <repo>/.venv).
USAGE
}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0)); }

while (($#)); do
    case $1 in
        --scenarios) scenarios=${2:?--scenarios needs a value}; shift 2 ;;
        --quick) quick=1; shift ;;
        --batch) batch=${2:?--batch needs a value}; shift 2 ;;
        --order) order=${2:?--order needs a value}; shift 2 ;;
        --no-warmup) warmup=0; shift ;;
        --rounds) rounds=${2:?--rounds needs a value}; shift 2 ;;
        --check) check=1; shift ;;
        --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

selected=()
IFS=, read -r -a _list <<<"$scenarios"
for s in "${_list[@]}"; do
    [[ $s =~ ^[abcd]$ ]] || die "--scenarios takes a comma-separated list of a, b, c, d (not '$s')"
    [[ " ${selected[*]} " == *" $s "* ]] || selected+=("$s")
done
((${#selected[@]})) || die "--scenarios is empty"
[[ $order == pg-first || $order == slotlake-first ]] || die "--order must be pg-first or slotlake-first"
for v in batch timeout_s rounds; do
    is_uint "${!v}" || die "--${v%_s} must be a positive integer"
done
batch=$((10#$batch)) timeout_s=$((10#$timeout_s)) rounds=$((10#$rounds))
div=$((quick ? 10 : 1))
command -v timeout >/dev/null || die "timeout (coreutils) is needed"
command -v curl >/dev/null || die "curl is needed (to start moto for s3://)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is needed for peak RSS; on Debian: apt-get install -y time"
[[ -x $PG_BIN/pg_recvlogical ]] || die "$PG_BIN/pg_recvlogical not found (set SLOTLAKE_PG_BIN)"

# --- slotlake binary ------------------------------------------------------------------------
slotlake=$(bench_slotlake_bin "$build" "$repo_dir") || exit 1

# --- cleanup --------------------------------------------------------------------------------
# work: results and sinks, outliving each scenario's server. client_pid: the client being
# timed (its `timeout` process, which leads a process group of its own: GNU time and the
# client are in it).
work=$(mktemp -d "${TMPDIR:-/tmp}/slotlake-bench-ingest.XXXXXX")
client_pid=
moto_pid=

# stop_group PID — SIGTERM to the process group PID leads, then waits (up to a minute) until
# every process in it is gone: GNU time dies at once, the client may still be committing.
stop_group() {
    kill -TERM -- "-$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    for _ in $(seq 1 600); do
        kill -0 -- "-$1" 2>/dev/null || return 0
        sleep 0.1
    done
}

on_exit() {
    if [[ -n $client_pid ]]; then
        stop_group "$client_pid"
    fi
    if [[ -n $moto_pid ]]; then
        kill -TERM "$moto_pid" 2>/dev/null || true
        wait "$moto_pid" 2>/dev/null || true
    fi
    pg_stop
    rm -rf -- "$work"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- moto (scenario b) ----------------------------------------------------------------------
s3_port=
if [[ " ${selected[*]} " == *" b "* ]]; then
    # shellcheck source=lib/venv.sh
    source "$script_dir/lib/venv.sh" || die "the Python venv (scripts/lib/venv.sh) is not usable"
    s3_port=$(pg_free_port)
    say "starting moto's S3 server on 127.0.0.1:$s3_port"
    "$SLOTLAKE_VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
    moto_pid=$!
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "http://127.0.0.1:$s3_port/"; then break; fi
        kill -0 "$moto_pid" 2>/dev/null || { cat "$work/moto.log" >&2; die "moto_server exited"; }
        sleep 0.1
    done
    curl -s -o /dev/null "http://127.0.0.1:$s3_port/" || die "moto_server did not answer on port $s3_port"
    # moto wants an Authorization header, not a valid signature.
    curl -sf -o /dev/null -X PUT "http://127.0.0.1:$s3_port/bench" \
        -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=x' \
        || die "could not create the bucket 'bench' in moto"
fi

# --- helpers --------------------------------------------------------------------------------
# cpu_busy — prints how busy the CPUs were (percent, all cores) over one second, from
# /proc/stat; "?" where there is none. Our server is idle when this runs, so this is other work,
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

secs_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }

# rss_mib FILE — GNU time's %M (KiB, first field of FILE's last line) as MiB; "?" when missing.
rss_mib() {
    local kib
    kib=$(tail -n 1 "$1" 2>/dev/null | awk '{ print $1 }' || true)
    if [[ $kib =~ ^[0-9]+$ ]]; then awk -v k="$kib" 'BEGIN { printf "%.0f", k / 1024 }'; else echo "?"; fi
}

# cpu_secs FILE — GNU time's %U + %S (second and third fields of FILE's last line): the
# client's CPU seconds, user and system; "?" when missing.
cpu_secs() {
    tail -n 1 "$1" 2>/dev/null | awk 'NF >= 3 { printf "%.2f", $2 + $3; ok = 1 } END { if (!ok) print "?" }'
}

# timed_client NAME SLOT [env assignments...] COMMAND... — runs COMMAND (under env, with the
# assignments) to its exit, bounded by --timeout, with GNU time recording its peak RSS in
# $sdir/SLOT.rss and its output in $sdir/SLOT.out and .err. Sets WALL (seconds, start to
# exit) and RSS (MiB); a failure or the time limit ends the script, naming NAME.
timed_client() {
    local name=$1 slot=$2 t_start t_end rc=0
    shift 2
    t_start=$(date +%s%N)
    timeout "$timeout_s" env "$@" >"$sdir/$slot.out" 2>"$sdir/$slot.err" &
    client_pid=$!
    wait "$client_pid" || rc=$?
    t_end=$(date +%s%N)
    if ((rc != 0)); then
        stop_group "$client_pid"
        client_pid=
        tail -n 20 "$sdir/$slot.err" >&2 || true
        if ((rc == 124)); then die "$name did not finish within ${timeout_s}s"; fi
        die "$name failed (exit status $rc; its stderr is above)"
    fi
    client_pid=
    WALL=$(secs_between "$t_start" "$t_end")
    RSS=$(rss_mib "$sdir/$slot.rss")
    CPU=$(cpu_secs "$sdir/$slot.rss")
}

# run_pg_recvlogical SLOT — drains SLOT to end_lsn with pg_recvlogical. Sets WALL and RSS.
run_pg_recvlogical() {
    local slot=$1 left
    timed_client pg_recvlogical "$slot" /usr/bin/time -f '%M %U %S' -o "$sdir/$slot.rss" \
        "$PG_BIN/pg_recvlogical" -d "$conn" --slot "$slot" --start \
        -P pgoutput -o proto_version=1 -o publication_names=bench \
        --endpos "$end_lsn" --no-loop -f /dev/null
    # pg_recvlogical confirms what it wrote on exit, so nothing may be left in its slot.
    left=$(pg_value "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('$slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'bench')")
    [[ $left == 0 ]] || die "pg_recvlogical stopped early: $left messages are left in slot $slot"
}

# run_slotlake SLOT SINK [run flags...] — slotlake run from SLOT into SINK with --stop-at
# end_lsn: it stops by itself once everything before the end is committed in the lake and
# confirmed, as pg_recvlogical --endpos does. Sets WALL, RSS and FILES (data files written,
# from its final log line).
run_slotlake() {
    local slot=$1 sink=$2 confirmed changes stopped
    shift 2
    timed_client "slotlake run" "$slot" \
        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
        /usr/bin/time -f '%M %U %S' -o "$sdir/$slot.rss" \
        "$slotlake" --log-level info --log-format json run --source "$conn" --slot "$slot" \
        --publication bench --sink "$sink" --flush-interval "${FLUSH_INTERVAL:-1s}" \
        --metrics-addr "127.0.0.1:0" --stop-at "$end_lsn" "$@"
    confirmed=$(pg_value "SELECT coalesce(confirmed_flush_lsn >= '$end_lsn', false) FROM pg_replication_slots WHERE slot_name = '$slot'")
    [[ $confirmed == t ]] || die "slotlake run exited without confirming $slot up to $end_lsn"
    stopped=$(grep '"message":"stopped"' "$sdir/$slot.err" | tail -n 1 || true)
    FILES=$(sed -n 's/.*"files_written":\([0-9]*\).*/\1/p' <<<"$stopped")
    changes=$(sed -n 's/.*"changes":\([0-9]*\).*/\1/p' <<<"$stopped")
    FILES=${FILES:-?}
    # The load's changes plus the marker row (counted by the last connection: a reconnect
    # during the run, itself worth knowing about, counts only what came after it).
    [[ $changes == "$((n_changes + 1))" ]] \
        || say "warning: slotlake counted ${changes:-?} changes from $slot, expected $((n_changes + 1)) (the load and the marker); a reconnect?"
}

# --- scenarios ------------------------------------------------------------------------------
PG_USER=bench
PG_DB=bench
: >"$work/results"
: >"$work/info"
max_busy=0

run_scenario() {
    local sc=$1 tables kind sink label n_txns t0 t1 start_lsn wal_bytes wal_mib rows busy
    local -a extra=()
    case $sc in
        a) tables=100 n_changes=$((1000000 / div)) kind=mixed sink=file label="a 100t file" ;;
        b) tables=100 n_changes=$((1000000 / div)) kind=mixed sink=s3 label="b 100t s3" ;;
        c) tables=5000 n_changes=$((1000000 / div)) kind=mixed sink=file label="c 5000t file" ;;
        d) tables=1 n_changes=$((5000000 / div)) kind=onetxn sink=file label="d 1txn file"
           extra=(--memory-budget 128MiB) ;;
    esac
    sdir=$work/$sc
    mkdir -p "$sdir"

    say ""
    say "=== scenario $label: $n_changes changes over $tables table(s) ==="
    say "starting a throwaway PostgreSQL ($PG_BIN)"
    # autovacuum off: it would otherwise vacuum the fresh tables while the clients are timed.
    # More locks: counting the rows of 5,000 tables in one query locks them all.
    pg_start shared_buffers=256MB max_wal_size=4GB autovacuum=off max_locks_per_transaction=256 \
        max_replication_slots=$((2 * rounds + 2))
    trap on_exit EXIT
    conn=$(pg_conninfo unix)
    server_version=$(pg_value "SHOW server_version")

    say "creating $tables table(s), a marker table, publication bench, $((2 * rounds + warmup)) slots"
    {
        for ((i = 0; i < tables; i++)); do
            printf 'CREATE TABLE t%04d (id bigint PRIMARY KEY, a int, b text, c numeric(12,2), d timestamptz, e boolean);\n' "$i"
        done
        echo "CREATE TABLE marker (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());"
        echo "CREATE PUBLICATION bench FOR ALL TABLES;"
        # Both timed slots at the same point in the WAL, before the load.
        ((warmup)) && echo "SELECT pg_create_logical_replication_slot('bench_warm', 'pgoutput');"
        for ((r = 1; r <= rounds; r++)); do
            echo "SELECT pg_create_logical_replication_slot('bench_pg_$r', 'pgoutput');"
            echo "SELECT pg_create_logical_replication_slot('bench_sl_$r', 'pgoutput');"
        done
    } >"$sdir/schema.sql"
    pg_psql -f "$sdir/schema.sql" >/dev/null
    start_lsn=$(pg_value "SELECT pg_current_wal_insert_lsn()")

    if [[ $kind == mixed ]]; then
        ((n_changes >= 10 * tables)) || die "internal: $n_changes changes are too few for $tables tables"
        write_workload "$tables" "$n_changes" "$batch" 4 "$sdir/load.sql"
        read -r n_ins n_upd n_del < <(sed -n 's/^-- totals //p' "$sdir/load.sql")
        ((n_ins + n_upd + n_del == n_changes)) || die "internal: workload has $((n_ins + n_upd + n_del)) changes, not $n_changes"
        n_txns=$(grep -c '^[IUD]' "$sdir/load.sql")
    else
        printf "INSERT INTO t0000 SELECT g, g %% 100000, md5(g::text), g * 1.25, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', g %% 2 = 0 FROM generate_series(1, %d) g;\n" \
            "$n_changes" >"$sdir/load.sql"
        n_ins=$n_changes n_upd=0 n_del=0 n_txns=1
    fi

    say "loading $n_changes changes ($n_ins inserts, $n_upd updates, $n_del deletes) in $n_txns transaction(s)"
    t0=$(date +%s%N)
    pg_psql -f "$sdir/load.sql" >/dev/null
    t1=$(date +%s%N)
    # The end: a marker row after the load, and the WAL insert position after its commit (not
    # pg_current_wal_lsn(), the write position: with synchronous_commit off the last commits
    # may not be written yet). The CHECKPOINT flushes them, and writes WAL past end_lsn, which
    # lets pg_recvlogical --endpos see the end.
    pg_psql -c "INSERT INTO marker (id) VALUES (1)" >/dev/null
    end_lsn=$(pg_value "SELECT pg_current_wal_insert_lsn()")
    wal_bytes=$(pg_value "SELECT pg_wal_lsn_diff('$end_lsn', '$start_lsn')::bigint")
    rows=$(pg_value "SELECT coalesce(sum((xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I', relname), false, true, '')))[1]::text::bigint), 0) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace AND relname ~ '^t[0-9]{4}\$'")
    ((rows == n_ins - n_del)) || die "the tables hold $rows rows, expected $((n_ins - n_del))"
    pg_psql -c CHECKPOINT >/dev/null
    wal_mib=$(awk -v b="$wal_bytes" 'BEGIN { printf "%.0f", b / 1048576 }')
    say "loaded in $(secs_between "$t0" "$t1")s; $wal_mib MiB of WAL; end LSN $end_lsn"

    busy=$(cpu_busy)
    if [[ $busy != "?" ]]; then
        ((busy <= max_busy)) || max_busy=$busy
        if ((busy > 10)); then
            say "warning: the CPUs were ${busy}% busy with other work just before the runs; the numbers will be skewed"
        fi
    fi

    if ((warmup)); then
        say "warm-up: draining bench_warm with pg_recvlogical (untimed)"
        run_pg_recvlogical bench_warm
        say "  took ${WALL}s"
        pg_psql -c "SELECT pg_drop_replication_slot('bench_warm')" >/dev/null
    fi

    local sink_url tools tool round pg_first=0
    [[ $order == pg-first ]] && pg_first=1
    [[ $sink == s3 ]] && extra+=(--s3-endpoint "http://127.0.0.1:$s3_port" --s3-allow-http)
    for ((round = 1; round <= rounds; round++)); do
        if [[ $sink == s3 ]]; then
            sink_url=s3://bench/$sc-$round
        else
            mkdir -p "$sdir/lake-$round"
            sink_url=file://$sdir/lake-$round
        fi
        # The given order in odd rounds, the other in even ones.
        if ((round % 2 == pg_first)); then tools=(pg sl); else tools=(sl pg); fi
        for tool in "${tools[@]}"; do
            if [[ $tool == pg ]]; then
                say "pg_recvlogical drains bench_pg_$round"
                run_pg_recvlogical "bench_pg_$round"
                say "  ${WALL}s, peak RSS ${RSS} MiB, ${CPU} CPU s"
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" pg_recvlogical "$n_changes" "$WALL" "$RSS" - "$CPU" "$round" >>"$work/results"
            else
                say "slotlake run drains bench_sl_$round into $sink_url ${extra[*]}"
                run_slotlake "bench_sl_$round" "$sink_url" "${extra[@]}"
                if [[ $sink == file ]]; then
                    # On file:// the files themselves are counted (committed and orphaned
                    # alike; after a clean run there are no orphans).
                    local parquet
                    parquet=$(find "$sdir/lake-$round" -name '*.parquet' -type f | wc -l)
                    [[ $parquet == "$FILES" ]] \
                        || say "warning: slotlake reported $FILES files written but the sink holds $parquet parquet files"
                    FILES=$parquet
                fi
                say "  ${WALL}s, peak RSS ${RSS} MiB, ${CPU} CPU s, $FILES files"
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" slotlake "$n_changes" "$WALL" "$RSS" "$FILES" "$CPU" "$round" >>"$work/results"
            fi
        done
    done
    printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$tables" "$n_txns" "$wal_mib" "$busy" >>"$work/info"

    pg_stop
    rm -rf -- "$sdir"/lake-*
}

for sc in "${selected[@]}"; do
    run_scenario "$sc"
done

# --- report ---------------------------------------------------------------------------------
echo
echo "PostgreSQL $server_version; slotlake run --flush-interval 1s; $( ((quick)) && echo "--quick (sizes / 10); ")$( ((warmup)) && echo "after an untimed warm-up drain; ")$order$( ((rounds > 1)) && echo ", then alternating; $rounds rounds"); CPUs at most ${max_busy}% busy with other work before the runs"
awk -F'\t' '{ printf "  %-13s %5d table(s), %6d transaction(s), %5s MiB WAL\n", $1, $2, $3, $4 }' "$work/info"
echo
awk -F'\t' -v quick="$quick" -v goals_file="$work/goals" '
function rss_ok(r, lim, strict) { return r != "?" && (strict ? r + 0 < lim : r + 0 <= lim) }
# The median of the ratios of scenario k (sorted in place), and all of them in run order.
function median(k,    i, j, t, v) {
    for (i = 1; i <= nr[k]; i++) v[i] = rs[k, i] + 0
    for (i = 2; i <= nr[k]; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return nr[k] % 2 ? v[(nr[k] + 1) / 2] : (v[nr[k] / 2] + v[nr[k] / 2 + 1]) / 2
}
function shown(k,    i, all) {
    if (nr[k] == 1) return rs[k, 1] "x"
    for (i = 1; i <= nr[k]; i++) all = all (i > 1 ? ", " : "") rs[k, i]
    return sprintf("%.2fx, the median of %d rounds (%s)", median(k), nr[k], all)
}
{
    sc[NR] = $1; tool[NR] = $2; n[NR] = $3; w[NR] = $4; rss[NR] = $5; files[NR] = $6; cpu[NR] = $7; rd[NR] = $8
    if ($2 == "pg_recvlogical") pgw[$1, $8] = $4
}
END {
    printf "%-13s %5s %-15s %9s %8s %10s %6s %9s %6s %7s %10s\n", "scenario", "round", "tool", "changes", "seconds", "changes/s", "ratio", "RSS MiB", "files", "CPU s", "CPU us/chg"
    for (i = 1; i <= NR; i++) {
        ratio = (tool[i] == "slotlake" && pgw[sc[i], rd[i]] > 0) ? sprintf("%.2f", pgw[sc[i], rd[i]] / w[i]) : "-"
        if (tool[i] == "slotlake") {
            k = substr(sc[i], 1, 1)
            if (ratio != "-") { nr[k]++; rs[k, nr[k]] = ratio }
            # The highest peak RSS of the rounds.
            if (rss[i] == "?" || m[k] == "?") m[k] = "?"
            else if (!(k in m) || rss[i] + 0 > m[k] + 0) m[k] = rss[i]
        }
        per = (cpu[i] != "?" && cpu[i] != "") ? sprintf("%.2f", cpu[i] * 1e6 / n[i]) : "?"
        printf "%-13s %5s %-15s %9d %8.3f %10.0f %6s %9s %6s %7s %10s\n", sc[i], rd[i], tool[i], n[i], w[i], n[i] / w[i], ratio, rss[i], files[i], cpu[i], per
    }
    print ""
    missed = 0
    if ("a" in nr) { ok = median("a") >= 0.8; missed += !ok; printf "goal a: slotlake >= 0.8x pg_recvlogical to file:// with 100 tables: %s (%s)\n", shown("a"), ok ? "met" : "MISSED" }
    if ("b" in nr) printf "       s3:// (moto on loopback), no goal: %s\n", shown("b")
    if ("c" in m) { ok = rss_ok(m["c"], 512, 0); missed += !ok; printf "goal c: peak RSS <= 512 MiB with 5000 tables: %s MiB (%s)\n", m["c"], ok ? "met" : "MISSED" }
    if ("d" in m) { ok = rss_ok(m["d"], 256, 1); missed += !ok; printf "goal d: peak RSS < 256 MiB, one big transaction, --memory-budget 128MiB: %s MiB (%s)\n", m["d"], ok ? "met" : "MISSED" }
    if (quick) print "(--quick: the goals are for the full sizes)"
    print missed > goals_file
}' "$work/results"

if ((check)) && [[ $(cat "$work/goals") != 0 ]]; then
    say "$(cat "$work/goals") goal(s) missed"
    exit 3
fi
