#!/usr/bin/env bash
#
# scripts/bench-snapshot.sh — the initial snapshot against COPY, in the same run.
#
# A throwaway server with ROWS rows over TABLES tables (one of them BIG_ROWS rows, the rest
# split evenly); columns: id bigint primary key, a bigint, b text, c timestamptz, d numeric.
#
#   baseline  `COPY <table> TO STDOUT (FORMAT binary)` of every table to /dev/null, with WORKERS
#             psql processes in parallel (tables largest first, the big one split by ctid
#             ranges like slotlake's chunks)
#   slotlake  `slotlake run --create-slot --snapshot-workers WORKERS` into file:// until the log
#             says the load is done (the change logs written, zstd Parquet)
#
# The baseline runs twice, just before and just after slotlake's load (the machine's speed
# drifts); the ratio is against the mean of the two.
#
# Prints both rates (rows per second), the ratio, slotlake's peak RSS, CPU time per row and
# Parquet bytes per row. Then (RESUME=0 skips
# it) the load again under a new slot, killed with SIGKILL at RESUME_AT (default 0.5) of the time
# the first load took and restarted: how long the restart took to finish, and how many rows it
# read (tables finished before the kill are skipped; a table killed mid-way goes on from its
# first unfinished chunk).
#
#   scripts/bench-snapshot.sh                              # 20,000,000 rows, 50 tables
#   ROWS=2000000 BIG_ROWS=1000000 scripts/bench-snapshot.sh   # a quick run
#
# Environment: SLOTLAKE_BIN (default: cargo build --release), SLOTLAKE_PG_BIN, WORKERS (4),
# CHUNK (slotlake's --snapshot-chunk-size, default 64MiB).

set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
ROWS=${ROWS:-20000000}
BIG_ROWS=${BIG_ROWS:-10000000}
TABLES=${TABLES:-50}
WORKERS=${WORKERS:-4}
CHUNK=${CHUNK:-64MiB}

# shellcheck source=lib/slotlake-bin.sh
source "$script_dir/lib/slotlake-bin.sh"

PG_USER=bench
# shellcheck source=lib/pg.sh
source "$script_dir/lib/pg.sh"
pg_start shared_buffers=1GB max_wal_size=8GB autovacuum=off
conn=$(pg_conninfo unix)

echo "== loading $ROWS rows over $TABLES tables (big: $BIG_ROWS)" >&2
rest=$(( (ROWS - BIG_ROWS) / (TABLES - 1) ))
{
  echo "CREATE TABLE t00 (id bigint PRIMARY KEY, a bigint, b text, c timestamptz, d numeric(12,2));"
  echo "INSERT INTO t00 SELECT g, g * 7, 'row ' || g, '2026-01-01'::timestamptz + g * interval '1 second', g / 100.0 FROM generate_series(1, $BIG_ROWS) g;"
  for i in $(seq 1 $((TABLES - 1))); do
    t=$(printf 't%02d' "$i")
    echo "CREATE TABLE $t (id bigint PRIMARY KEY, a bigint, b text, c timestamptz, d numeric(12,2));"
    echo "INSERT INTO $t SELECT g, g * 7, 'row ' || g, '2026-01-01'::timestamptz + g * interval '1 second', g / 100.0 FROM generate_series(1, $rest) g;"
  done
  echo "VACUUM ANALYZE;"
  echo "CREATE PUBLICATION bench FOR ALL TABLES;"
} | pg_psql >/dev/null
total=$(pg_value "SELECT sum(n_live_tup) FROM pg_stat_user_tables")
echo "   $total rows" >&2

echo "== baseline: COPY (FORMAT binary) to /dev/null, $WORKERS connections" >&2
jobs_file="$PG_DIR/copy_jobs"
: > "$jobs_file"
pages=$(pg_value "SELECT pg_relation_size('t00') / current_setting('block_size')::int")
per=$(( (pages + WORKERS * 2 - 1) / (WORKERS * 2) ))
for k in $(seq 0 $((WORKERS * 2 - 1))); do
  lo=$((k * per)); hi=$(((k + 1) * per))
  echo "COPY (SELECT * FROM t00 WHERE ctid >= '($lo,0)'::tid AND ctid < '($hi,0)'::tid) TO STDOUT (FORMAT binary)" >> "$jobs_file"
done
for i in $(seq 1 $((TABLES - 1))); do
  echo "COPY $(printf 't%02d' "$i") TO STDOUT (FORMAT binary)" >> "$jobs_file"
done
copy_all() {
  local start
  start=$(date +%s.%N)
  # shellcheck disable=SC2016
  xargs -P "$WORKERS" -I{} -d '\n' "$PG_BIN/psql" -X -q -h "$PG_SOCKDIR" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -o /dev/null -c '{}' < "$jobs_file"
  echo "$(date +%s.%N) - $start" | bc
}
copy_before=$(copy_all)

echo "== slotlake run --create-slot (initial snapshot, $WORKERS workers)" >&2
lake="$PG_DIR/lake"
log="$PG_DIR/run.log"
start=$(date +%s.%N)
/usr/bin/time -f '%M %U %S' -o "$PG_DIR/rss" "$SLOTLAKE_BIN" run --source "$conn" --slot bench --publication bench \
  --sink "file://$lake" --create-slot --snapshot-workers "$WORKERS" --snapshot-chunk-size "$CHUNK" \
  --compact-interval 0 --metrics-addr 127.0.0.1:0 2> "$log" &
pid=$!
until grep -q "initial snapshot: done" "$log"; do
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; pg_die "slotlake run stopped"; }
  sleep 0.2
done
snap_secs=$(echo "$(date +%s.%N) - $start" | bc)
# $pid is /usr/bin/time; SIGTERM goes to slotlake, its child.
pkill -TERM -P "$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
wait "$pid" || true
grep "initial snapshot: done" "$log" >&2
# The baseline again after the load: this machine's speed drifts, so the ratio is taken against
# the mean of a run just before and one just after.
echo "== baseline again: COPY (FORMAT binary) to /dev/null" >&2
copy_after=$(copy_all)
copy_secs=$(echo "($copy_before + $copy_after) / 2" | bc -l)
read -r rss_kib cpu_user cpu_sys < <(tail -1 "$PG_DIR/rss" 2>/dev/null || echo "0 0 0")
parquet_bytes=$(find "$lake/changes" -name '*.parquet' -printf '%s\n' | awk '{s += $1} END {print s + 0}')

python3 - "$total" "$copy_secs" "$snap_secs" "$rss_kib" "$cpu_user" "$cpu_sys" "$parquet_bytes" "$copy_before" "$copy_after" <<'PY'
import sys
rows, copy_s, snap_s, rss = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cpu = float(sys.argv[5]) + float(sys.argv[6])
parquet = int(sys.argv[7])
before, after = float(sys.argv[8]), float(sys.argv[9])
print(f"COPY binary to /dev/null : {copy_s:7.2f} s  {rows / copy_s:12,.0f} rows/s  (mean of {before:.2f} s before and {after:.2f} s after the load)")
print(f"slotlake initial snapshot: {snap_s:7.2f} s  {rows / snap_s:12,.0f} rows/s  peak RSS {int(rss or 0) / 1024:.0f} MiB")
print(f"slotlake CPU: {cpu:.2f} s ({cpu / rows * 1e9:,.0f} ns per row; the run, streaming start and shutdown included)")
print(f"slotlake Parquet written: {parquet / 2**20:,.1f} MiB ({parquet / rows:.1f} bytes per row)")
print(f"ratio slotlake/COPY: {copy_s / snap_s:.2f}x")
PY

if [ "${RESUME:-1}" != 0 ]; then
  echo "== resume: the same load under a new slot, SIGKILL halfway, restarted" >&2
  lake2="$PG_DIR/lake2"
  log2="$PG_DIR/run2.log"
  run2() {
    "$SLOTLAKE_BIN" run --source "$conn" --slot bench2 --publication bench --sink "file://$lake2" \
      --create-slot --snapshot-workers "$WORKERS" --snapshot-chunk-size "$CHUNK" \
      --compact-interval 0 --metrics-addr 127.0.0.1:0 2>> "$log2" &
    pid=$!
  }
  run2
  kill_at=$(echo "$snap_secs * ${RESUME_AT:-0.5}" | bc -l)
  sleep "$kill_at"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  grep -q "initial snapshot: done" "$log2" && pg_die "the load finished before the kill; lower RESUME_AT"
  start=$(date +%s.%N)
  run2
  until grep -q "initial snapshot: done" "$log2"; do
    kill -0 "$pid" 2>/dev/null || { cat "$log2" >&2; pg_die "slotlake run stopped"; }
    sleep 0.2
  done
  resume_secs=$(echo "$(date +%s.%N) - $start" | bc)
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
  grep "initial snapshot: resuming\|initial snapshot: loading\|initial snapshot: done" "$log2" >&2
  read_again=$(grep "initial snapshot: done" "$log2" | tail -1 | grep -o 'rows=[0-9]*' | cut -d= -f2)
  python3 - "$total" "$snap_secs" "$resume_secs" "$read_again" "$kill_at" <<'PY'
import sys
rows, snap_s, resume_s, again = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
kill_at = float(sys.argv[5])
print(f"killed at {kill_at:.2f} s; the restart finished in {resume_s:.2f} s "
      f"({resume_s / snap_s:.0%} of an uninterrupted load), reading {again:,} of {rows:,} rows ({again / rows:.0%})")
PY
fi
