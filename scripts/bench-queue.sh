#!/usr/bin/env bash
#
# scripts/bench-queue.sh — compaction of a table that deletes what it inserts (a job queue),
# with and without --tombstone-retention, as its deleted keys pile up.
#
# A queue table's change log (scripts/lib/bench_queue.py): every commit inserts ROWS new rows
# and deletes the previous commit's, so the table holds ROWS live rows and gains ROWS tombstones
# a commit. For each RETENTIONS setting, in a lake of its own: the first EARLY commits are
# compacted, one more commit is compacted (untimed: it also merges the change log's small
# files), then two more, each compacted on its own and timed (wall time and peak RSS). The same
# again after COMMITS commits. Without a retention the time grows with the tombstones; with
# one it stays that of the live rows.
#
#   scripts/bench-queue.sh                      # 100,000 rows; 10 and 60 commits; off, 1s
#   ROWS=10000 EARLY=3 COMMITS=12 RETENTIONS="off 100ms" scripts/bench-queue.sh   # quick
#
# Environment: SLOTLAKE_BIN (default: cargo build --release), SLOTLAKE_VENV (the Python venv,
# made by scripts/lib/venv.sh), BENCH_DIR (default a temp dir), ROWS, EARLY, COMMITS,
# RETENTIONS (default "off 1s"; commit times advance 1 µs a change, 0.2 s a commit of 100,000
# rows).

set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

ROWS=${ROWS:-100000}
EARLY=${EARLY:-10}
COMMITS=${COMMITS:-60}
RETENTIONS=${RETENTIONS:-off 1s}
((EARLY >= 1 && COMMITS > EARLY)) || { echo "need 1 <= EARLY < COMMITS" >&2; exit 2; }

# shellcheck source=lib/venv.sh
source "$script_dir/lib/venv.sh"
py="$SLOTLAKE_VENV/bin/python"
gen="$script_dir/lib/bench_queue.py"

# shellcheck source=lib/slotlake-bin.sh
source "$script_dir/lib/slotlake-bin.sh"

dir=${BENCH_DIR:-$(mktemp -d /tmp/slotlake-bench-queue.XXXXXX)}
trap '[ -z "${BENCH_DIR:-}" ] && rm -rf "$dir"' EXIT

# compact <lake> <retention> <label>: one `slotlake compact`; prints the label, wall time, peak
# RSS and the report's bucket count when a label is given.
compact() {
  local out
  out=$(/usr/bin/time -f 'time %e %M' "$SLOTLAKE_BIN" compact --sink "file://$1" --format json \
    --tombstone-retention "$2" 2>&1 >"$dir/report.json" | grep '^time ' | tail -1)
  if [ -n "${3:-}" ]; then
    read -r _ secs kb <<<"$out"
    read -r buckets merged < <("$py" -c 'import json,sys; r = json.load(open(sys.argv[1])); print(r["buckets"], r["history_files_merged"] + r["changelog_files_merged"])' "$dir/report.json")
    printf '%-10s %-26s %6.2f s  peak RSS %5d MiB  %d bucket(s)  %d small files merged\n' "$2" "$3" "$secs" $((kb / 1024)) "$buckets" "$merged"
  fi
}

echo "== queue of $ROWS rows; compaction of single commits after $EARLY and $COMMITS commits" >&2
for retention in $RETENTIONS; do
  lake="$dir/lake-$retention"
  changes="$lake/changes/public/queue"
  rm -rf "$lake"
  mkdir -p "$(dirname "$changes")"
  "$py" "$gen" "$changes" 0 "$EARLY" "$ROWS"
  compact "$lake" "$retention"
  k=$EARLY
  for stage in early late; do
    if [ $stage = late ]; then
      "$py" "$gen" "$changes" "$k" "$COMMITS" "$ROWS"
      compact "$lake" "$retention"
      k=$COMMITS
    fi
    "$py" "$gen" "$changes" "$k" $((k + 1)) "$ROWS"
    compact "$lake" "$retention"
    k=$((k + 1))
    for _ in 1 2; do
      "$py" "$gen" "$changes" "$k" $((k + 1)) "$ROWS"
      compact "$lake" "$retention" "commit $((k + 1)) ($(((k - 1) * ROWS)) tombstones)"
      k=$((k + 1))
    done
  done
  du -sh "$lake/history" | awk -v r="$retention" '{print r, "history directory", $1}'
done
