#!/usr/bin/env bash
#
# scripts/bench-compact.sh — compaction throughput against DuckDB, in the same run.
#
#   1. A change log of CHANGES change rows over KEYS keys (inserts, then updates of
#      pseudo-random keys, every 97th a delete) in slotlake's change-log layout, as a Delta
#      table of 10 commits (written by delta-rs, not by slotlake).
#   2. `slotlake compact` folds it into the current (SCD1) and history (SCD2) tables.
#   3. DuckDB computes the same SCD1 from the same Parquet files with SQL (latest per key by
#      _lsn, _seq; deletes removed) and writes it as zstd Parquet.
#   4. The two SCD1 results are compared row for row (the bench fails if they differ).
#   5. 100,000 more updates are appended and compacted incrementally: the share of the current
#      table's bytes written is reported, and the SCD1 compared with DuckDB's again.
#      COMPACT_FLAGS=--deletion-vectors patches buckets instead of rewriting them.
#
# Prints both rates (change rows per second), the ratio slotlake/DuckDB, peak RSS of each, and
# the incremental rewrite share. slotlake writes the history table as well; DuckDB only the
# SCD1 — the ratio is therefore conservative for slotlake. For context, DuckDB also computes
# the SCD2 side (every change a version ended by the key's next change, a window `lead`) and
# writes it; the time of both DuckDB queries against slotlake's is printed as well.
#
#   scripts/bench-compact.sh                 # 10,000,000 changes over 1,000,000 keys
#   CHANGES=1000000 KEYS=100000 scripts/bench-compact.sh   # a quick run
#   ROUNDS=5 scripts/bench-compact.sh        # 5 rounds, the median ratio
#
# With ROUNDS=N, steps 2 and 3 run N times, alternating which goes first, slotlake each time
# into a lake of its own with a fresh copy of the change log (hard links: no copy is timed): a
# shared host's noise moves single runs by ±25 %, and the median of the rounds' ratios is what
# to compare. Steps 4 and 5 use the last round's lake.
#
# Environment: SLOTLAKE_BIN (default: cargo build --release), SLOTLAKE_VENV (the Python venv
# with duckdb and deltalake, made by scripts/lib/venv.sh), BENCH_DIR (default a temp dir),
# COMPACT_FLAGS (extra flags for slotlake compact), ROUNDS (default 1).

set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

CHANGES=${CHANGES:-10000000}
KEYS=${KEYS:-1000000}
UPDATES=${UPDATES:-100000}
ROUNDS=${ROUNDS:-1}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer" >&2; exit 2; }

# shellcheck source=lib/venv.sh
source "$script_dir/lib/venv.sh"
py="$SLOTLAKE_VENV/bin/python"
helper="$script_dir/lib/bench_compact.py"

# shellcheck source=lib/slotlake-bin.sh
source "$script_dir/lib/slotlake-bin.sh"

dir=${BENCH_DIR:-$(mktemp -d /tmp/slotlake-bench-compact.XXXXXX)}
trap '[ -z "${BENCH_DIR:-}" ] && rm -rf "$dir"' EXIT
lake="$dir/lake"
changes="$lake/changes/public/bench"
mkdir -p "$changes"

echo "== generating $CHANGES changes over $KEYS keys (delta-rs + DuckDB)" >&2
"$py" "$helper" generate "$changes" --keys "$KEYS" --changes "$CHANGES" --commits 10
du -sh "$changes" >&2

# The change log as generated, for DuckDB and the rounds after the first (hard links: nothing
# writes a data file in place); with one round, the change log itself.
pristine=$changes
if ((ROUNDS > 1)); then
  pristine="$dir/pristine-changes"
  cp -al "$changes" "$pristine"
fi

run_slotlake() {
  echo "== slotlake compact (round $1 of $ROUNDS)" >&2
  if (($1 > 1)); then
    # A lake of its own: deleting the last round's files here would tax this round's (ext4
    # walks the inodes it freed moments ago when it allocates new ones).
    lake="$dir/lake-$1"
    changes="$lake/changes/public/bench"
    mkdir -p "$(dirname "$changes")"
    cp -al "$pristine" "$changes"
  fi
  /usr/bin/time -f '%e %M' -o "$dir/slotlake.time" \
    "$SLOTLAKE_BIN" compact --sink "file://$lake" --format json ${COMPACT_FLAGS:-} > "$dir/slotlake.json"
  cat "$dir/slotlake.json" >&2
  cat "$dir/slotlake.time" >> "$dir/slotlake.rounds"
}

run_duckdb() {
  echo "== DuckDB, same files, same machine (round $1 of $ROUNDS)" >&2
  /usr/bin/time -f '%e %M' -o "$dir/duck.time" \
    "$py" "$helper" duckdb "$pristine" "$dir/duck.parquet" > "$dir/duck.out"
  read -r d_query_secs d_rows < "$dir/duck.out"
  echo "$(cat "$dir/duck.time") $d_query_secs $d_rows" >> "$dir/duck.rounds"
}

: > "$dir/slotlake.rounds"
: > "$dir/duck.rounds"
for ((round = 1; round <= ROUNDS; round++)); do
  if ((round % 2)); then
    run_slotlake "$round"
    run_duckdb "$round"
  else
    run_duckdb "$round"
    run_slotlake "$round"
  fi
done

echo "== DuckDB SCD2 (context: the history side slotlake also writes)" >&2
/usr/bin/time -f '%e %M' -o "$dir/duckh.time" \
  "$py" "$helper" duckdb-history "$changes" "$dir/duckh.parquet" > "$dir/duckh.out"
read -r h_query_secs h_rows < "$dir/duckh.out"
read -r h_secs h_rss < "$dir/duckh.time"

echo "== comparing the two SCD1 results" >&2
"$py" "$helper" check "$lake/current/public/bench" "$dir/duck.parquet" >&2

echo "== $UPDATES more updates, compacted incrementally" >&2
"$py" "$helper" append "$changes" --updates "$UPDATES" --first-lsn $((CHANGES + 1)) --keys "$KEYS"
/usr/bin/time -f '%e %M' -o "$dir/incr.time" \
  "$SLOTLAKE_BIN" compact --sink "file://$lake" --format json ${COMPACT_FLAGS:-} > "$dir/incr.json"
read -r i_secs i_rss < "$dir/incr.time"
cat "$dir/incr.json" >&2
echo "== comparing again after the incremental compaction" >&2
"$py" "$helper" duckdb "$changes" "$dir/duck2.parquet" > /dev/null
"$py" "$helper" check "$lake/current/public/bench" "$dir/duck2.parquet" >&2

"$py" - "$CHANGES" "$dir/slotlake.rounds" "$dir/duck.rounds" "$dir/incr.json" "$i_secs" "$h_secs" "$h_rows" <<'PY'
import json, statistics, sys
changes, s_rounds, d_rounds, incr, i_secs, h_secs, h_rows = sys.argv[1:]
changes = int(changes)
slot = [line.split() for line in open(s_rounds).read().splitlines()]
duck = [line.split() for line in open(d_rounds).read().splitlines()]
ratios = [float(d[0]) / float(s[0]) for s, d in zip(slot, duck)]
s_secs = statistics.median(float(s[0]) for s in slot)
d_secs = statistics.median(float(d[0]) for d in duck)
d_q = statistics.median(float(d[2]) for d in duck)
s_rss = max(int(s[1]) for s in slot)
d_rss = max(int(d[1]) for d in duck)
d_rows = duck[-1][3]
s_rate = changes / s_secs
d_rate = changes / d_secs
r = json.loads(open(incr).read().splitlines()[0])
share = r["current_bytes_rewritten"] / max(r["current_bytes"], 1)
rounds = len(ratios)
what = "median of " + str(rounds) + " rounds, " if rounds > 1 else ""
print(f"slotlake compact : {s_secs:8.2f} s  {s_rate:12,.0f} changes/s  peak RSS {s_rss/1024:7.0f} MiB  ({what}current + history)")
print(f"DuckDB SCD1      : {d_secs:8.2f} s  {d_rate:12,.0f} changes/s  peak RSS {d_rss/1024:7.0f} MiB  (query {d_q:.2f} s, {int(d_rows):,} rows)")
if rounds > 1:
    print("ratio slotlake/DuckDB: " + f"{statistics.median(ratios):.2f}x median of " + str(rounds) + " rounds ("
          + ", ".join(f"{x:.2f}" for x in ratios) + ")")
else:
    print(f"ratio slotlake/DuckDB: {ratios[0]:.2f}x")
both = d_secs + float(h_secs)
print(f"context: DuckDB SCD2 {float(h_secs):.2f} s ({int(h_rows):,} versions); slotlake vs DuckDB SCD1 + SCD2 "
      f"({both:.2f} s): {both / s_secs:.2f}x")
print(f"incremental: {r['changes']:,} changes in {float(i_secs):.2f} s; rewrote {r['buckets_rewritten']}/{r['buckets']} buckets, "
      f"patched {r['buckets_patched']}; wrote {r['current_bytes_rewritten']:,} of {r['current_bytes']:,} current-table bytes ({share:.1%})")
PY
