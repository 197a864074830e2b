#!/usr/bin/env python3
"""Helpers of scripts/bench-compact.sh (not slotlake code: DuckDB and delta-rs do the work).

    bench_compact.py generate <table-dir> --keys K --changes N --commits C
        A change log in slotlake's layout (source columns id, amount, name + _op, _lsn, _seq,
        _xid, _commit_ts, _unchanged, _special, _old_id) as a Delta table of C commits:
        K inserts, then updates of pseudo-random keys, every 97th change a delete.
    bench_compact.py append <table-dir> --updates U --first-lsn L --keys K
        One more commit of U updates.
    bench_compact.py duckdb <table-dir> <out.parquet>
        The SCD1 computed by DuckDB from the Parquet files of the Delta log: the latest change
        per key by (_lsn, _seq), deletes removed, written to <out.parquet>. Prints
        "seconds rows".
    bench_compact.py check <current-table-dir> <duck.parquet>
        Exits 1 unless slotlake's current table (read by delta-rs) has the same (id, amount,
        name) rows as DuckDB's result.
"""

import argparse
import sys
import time

import duckdb
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from read_delta import arrow_table  # same directory: the DV-aware reader

GEN = """
SELECT
  CASE WHEN i < {keys} THEN i ELSE hash(i) % {keys} END::BIGINT AS id,
  CASE WHEN i >= {keys} AND i % 97 = 0 THEN NULL ELSE (hash(i * 7) % 1000000)::BIGINT END AS amount,
  CASE WHEN i >= {keys} AND i % 97 = 0 THEN NULL ELSE 'name-' || (hash(i * 13) % 100000)::VARCHAR END AS name,
  CASE WHEN i < {keys} THEN 'I' WHEN i % 97 = 0 THEN 'D' ELSE 'U' END AS _op,
  (i + 1)::BIGINT AS _lsn,
  0::BIGINT AS _seq,
  (i + 1000)::BIGINT AS _xid,
  (TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_microseconds(i)) AS _commit_ts,
  []::VARCHAR[] AS _unchanged,
  []::VARCHAR[] AS _special,
  NULL::BIGINT AS _old_id
FROM range({start}, {end}) t(i)
"""


def gen(table, keys, start, end):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    t = con.sql(GEN.format(keys=keys, start=start, end=end)).to_arrow_table()
    if isinstance(t, pa.RecordBatchReader):
        t = t.read_all()
    write_deltalake(table, t, mode="append")


def timed_copy(table, out, select):
    """Runs `select` (with {files}: the table's data files) into zstd Parquet at `out`; prints
    the seconds it took and the rows written."""
    files = DeltaTable(table).file_uris()
    con = duckdb.connect()
    started = time.perf_counter()
    con.execute(
        f"COPY ({select.format(files=repr(files))}) TO '{out}' (FORMAT parquet, COMPRESSION zstd)"
    )
    elapsed = time.perf_counter() - started
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
    print(f"{elapsed:.3f} {rows}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("table")
    g.add_argument("--keys", type=int, required=True)
    g.add_argument("--changes", type=int, required=True)
    g.add_argument("--commits", type=int, default=10)
    a = sub.add_parser("append")
    a.add_argument("table")
    a.add_argument("--updates", type=int, required=True)
    a.add_argument("--first-lsn", type=int, required=True)
    a.add_argument("--keys", type=int, required=True)
    d = sub.add_parser("duckdb")
    d.add_argument("table")
    d.add_argument("out")
    h = sub.add_parser("duckdb-history")
    h.add_argument("table")
    h.add_argument("out")
    c = sub.add_parser("check")
    c.add_argument("current")
    c.add_argument("duck")
    args = p.parse_args()

    if args.cmd == "generate":
        step = -(-args.changes // args.commits)
        for s in range(0, args.changes, step):
            gen(args.table, args.keys, s, min(s + step, args.changes))
    elif args.cmd == "append":
        # Updates only (never deletes): i starts past every generated change.
        start = args.first_lsn - 1
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        q = GEN.format(keys=args.keys, start=start, end=start + args.updates)
        q = q.replace("i % 97 = 0", "false")
        t = con.sql(q).to_arrow_table()
        if isinstance(t, pa.RecordBatchReader):
            t = t.read_all()
        write_deltalake(args.table, t, mode="append")
    elif args.cmd == "duckdb":
        timed_copy(
            args.table,
            args.out,
            """SELECT id, amount, name, _lsn, _commit_ts FROM (
                 SELECT *, row_number() OVER (PARTITION BY id ORDER BY _lsn DESC, _seq DESC) AS rn
                 FROM read_parquet({files}))
               WHERE rn = 1 AND _op <> 'D'""",
        )
    elif args.cmd == "duckdb-history":
        # Context for the ratio: the SCD2 side of what `slotlake compact` also writes — every
        # change a version, ended by the key's next change, deletes as tombstones.
        timed_copy(
            args.table,
            args.out,
            """SELECT id, amount, name,
                      _lsn AS _valid_from_lsn, lead(_lsn) OVER w AS _valid_to_lsn,
                      _commit_ts AS _valid_from, lead(_commit_ts) OVER w AS _valid_to,
                      lead(_lsn) OVER w IS NULL AS _is_current, _op = 'D' AS _deleted
               FROM read_parquet({files})
               WINDOW w AS (PARTITION BY id ORDER BY _lsn, _seq)""",
        )
    elif args.cmd == "check":
        con = duckdb.connect()
        ours = arrow_table(DeltaTable(args.current), columns=["id", "amount", "name"])
        con.register("ours", ours)
        diff = con.execute(
            f"""SELECT count(*) FROM (
                  (SELECT id, amount, name FROM ours EXCEPT ALL
                   SELECT id, amount, name FROM read_parquet('{args.duck}'))
                  UNION ALL
                  (SELECT id, amount, name FROM read_parquet('{args.duck}') EXCEPT ALL
                   SELECT id, amount, name FROM ours))"""
        ).fetchone()[0]
        if diff:
            print(f"slotlake and DuckDB differ in {diff} rows", file=sys.stderr)
            sys.exit(1)
        print(f"identical: {ours.num_rows} rows")


if __name__ == "__main__":
    main()
