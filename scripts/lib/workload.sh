# shellcheck shell=bash
#
# scripts/lib/workload.sh — what the benchmarks share: the slotlake binary they run and the
# mixed change workload.
#

# bench_slotlake_bin BUILD REPO_DIR — prints the slotlake binary to benchmark: $SLOTLAKE_BIN if
# set, else $CARGO_TARGET_DIR/release/slotlake (default <repo>/target), built first when BUILD
# is 1. Messages go to stderr; returns 1 when there is no binary.
bench_slotlake_bin() {
    local bin
    if [[ -n ${SLOTLAKE_BIN:-} ]]; then
        bin=$SLOTLAKE_BIN
    else
        export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$2/target}
        bin=$CARGO_TARGET_DIR/release/slotlake
        if (($1)); then
            printf '%s\n' "building slotlake (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR; the first build takes minutes)" >&2
            (cd "$2" && cargo build --release --quiet --bin slotlake) || { echo "error: cargo build failed" >&2; return 1; }
        fi
    fi
    [[ -x $bin ]] || { echo "error: slotlake binary $bin not found (build it, or drop --no-build)" >&2; return 1; }
    printf '%s\n' "$bin"
}

# write_workload TABLES CHANGES BATCH WIDTH FILE — SQL for CHANGES changes over TABLES tables
# named t<id zero-padded to WIDTH digits>, in transactions of at most BATCH rows. Per table (C
# changes): ids 1..ins are inserted, 1..upd updated, ins-del+1..ins deleted; the ranges are
# disjoint and every statement touches exactly the rows its range names, so the number of
# changes is exact. Statements of at most $batch rows, each its own transaction, round-robin
# over the tables: all inserts, then updates, then deletes. Ends with "-- totals I U D".
write_workload() {
    awk -v changes="$2" -v tables="$1" -v batch="$3" -v width="$4" '
function emit(kind, t, lo, hi,    name) {
    name = sprintf("t%0" width "d", t)
    if (kind == "I")
        printf "INSERT INTO %s SELECT g, g %% 100000, md5(g::text), g * 1.25, timestamptz %s + g * interval %s, g %% 2 = 0 FROM generate_series(%d, %d) g;\n", name, "'\''2024-01-01 00:00:00+00'\''", "'\''1 second'\''", lo, hi
    else if (kind == "U")
        printf "UPDATE %s SET a = a + 1, b = b || %s, c = c + 0.01, d = d + interval %s, e = NOT e WHERE id BETWEEN %d AND %d;\n", name, "'\''u'\''", "'\''1 day'\''", lo, hi
    else
        printf "DELETE FROM %s WHERE id BETWEEN %d AND %d;\n", name, lo, hi
}
BEGIN {
    base = int(changes / tables); rem = changes % tables
    maxn = 0
    for (t = 0; t < tables; t++) {
        c = base + (t < rem ? 1 : 0)
        ins[t] = int(c * 80 / 100); upd[t] = int(c * 15 / 100); del[t] = c - ins[t] - upd[t]
        if (ins[t] > maxn) maxn = ins[t]
    }
    for (k = 0; k * batch < maxn; k++)
        for (t = 0; t < tables; t++)
            if (k * batch < ins[t]) emit("I", t, k * batch + 1, (k + 1) * batch < ins[t] ? (k + 1) * batch : ins[t])
    for (k = 0; k * batch < maxn; k++)
        for (t = 0; t < tables; t++)
            if (k * batch < upd[t]) emit("U", t, k * batch + 1, (k + 1) * batch < upd[t] ? (k + 1) * batch : upd[t])
    for (k = 0; k * batch < maxn; k++)
        for (t = 0; t < tables; t++)
            if (k * batch < del[t]) {
                lo = ins[t] - del[t] + 1
                emit("D", t, lo + k * batch, lo + (k + 1) * batch - 1 < ins[t] ? lo + (k + 1) * batch - 1 : ins[t])
            }
    for (t = 0; t < tables; t++) { ti += ins[t]; tu += upd[t]; td += del[t] }
    printf "-- totals %d %d %d\n", ti, tu, td
}' </dev/null >"$5"
}

