#!/usr/bin/env python3
"""Helper of scripts/bench-queue.sh (not slotlake code: DuckDB and delta-rs do the work).

    bench_queue.py <table-dir> <first> <last> <rows>
        Appends change-log commits first..last-1 of a queue table in slotlake's change-log
        layout (source columns id, amount, name): commit k inserts ids [k*rows, (k+1)*rows) and
        deletes the ids commit k-1 inserted, so the table holds `rows` live rows and every
        commit leaves `rows` more deleted keys. Commit times advance one microsecond a change
        (0.2 s a commit of 100,000 rows).
"""

import sys

import duckdb
import pyarrow as pa
from deltalake import write_deltalake

COMMIT = """
SELECT
  CASE WHEN j < {rows} THEN {k} * {rows} + j ELSE ({k} - 1) * {rows} + j - {rows} END::BIGINT AS id,
  CASE WHEN j < {rows} THEN (hash(j * 7) % 1000000)::BIGINT ELSE NULL END AS amount,
  CASE WHEN j < {rows} THEN 'job-' || (hash(j * 13) % 100000)::VARCHAR ELSE NULL END AS name,
  CASE WHEN j < {rows} THEN 'I' ELSE 'D' END AS _op,
  ({k} * {rows} * 2 + j + 1)::BIGINT AS _lsn,
  0::BIGINT AS _seq,
  ({k} + 1000)::BIGINT AS _xid,
  (TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_microseconds({k} * {rows} * 2 + j)) AS _commit_ts,
  []::VARCHAR[] AS _unchanged,
  []::VARCHAR[] AS _special,
  NULL::BIGINT AS _old_id
FROM range(0, CASE WHEN {k} = 0 THEN {rows} ELSE 2 * {rows} END) t(j)
"""


def main():
    table, first, last, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for k in range(first, last):
        t = con.sql(COMMIT.format(k=k, rows=rows)).to_arrow_table()
        if isinstance(t, pa.RecordBatchReader):
            t = t.read_all()
        write_deltalake(table, t, mode="append")


if __name__ == "__main__":
    main()
