#!/usr/bin/env bash
# The newcomer's demo: a throwaway PostgreSQL with logical WAL, a slot and publication made by
# slotlake, some changes, `slotlake tail` printing them decoded, then `slotlake run` landing
# them as Delta change logs in ./lake, `slotlake compact` folding them into current (SCD1) and
# history (SCD2) tables, `slotlake verify` checking them against the source, all read back with
# an independent reader (Python deltalake).
#
#   ./scripts/demo.sh
#
# Needs PostgreSQL binaries (SLOTLAKE_PG_BIN, default /usr/lib/postgresql/15/bin) and cargo.
# Everything it starts is stopped and removed when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_USER=demo
# shellcheck source=lib/pg.sh
source scripts/lib/pg.sh

echo "== building slotlake (release)" >&2
cargo build --release --locked --quiet
SLOTLAKE="${CARGO_TARGET_DIR:-target}/release/slotlake"

echo "== starting a throwaway PostgreSQL" >&2
pg_start
SOURCE=$(pg_conninfo tcp)
echo "   source: $SOURCE" >&2

pg_psql -q <<'SQL'
CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, created timestamptz DEFAULT now());
CREATE TABLE orders (
  id bigint PRIMARY KEY, customer_id bigint REFERENCES customers, total numeric(12,2),
  status status, tags text[], placed date
);
SQL

echo "== slotlake slot create --create-publication" >&2
"$SLOTLAKE" slot create --source "$SOURCE" --slot demo --publication demo --create-publication

echo "== making changes" >&2
pg_psql -q <<'SQL'
INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'ada@example.com'), (2, 'Grace', NULL);
INSERT INTO orders VALUES (10, 1, 19.99, 'new', '{gift,express}', '2026-11-22'),
                          (11, 2, 1234567.89, 'paid', '{}', '2026-11-21');
UPDATE orders SET status = 'shipped' WHERE id = 10;
DELETE FROM orders WHERE id = 11;
UPDATE customers SET id = 3 WHERE id = 2;   -- a key change: tail shows old_key
BEGIN;
INSERT INTO customers (id, name) SELECT g, 'bulk ' || g FROM generate_series(100, 104) g;
COMMIT;
TRUNCATE orders;
SQL

echo "== slotlake slot status" >&2
"$SLOTLAKE" slot status --source "$SOURCE" --slot demo

echo "== slotlake tail --limit 13   (decoded changes, one JSON line each)" >&2
"$SLOTLAKE" tail --source "$SOURCE" --slot demo --publication demo --limit 13

echo "== slotlake run --sink file://$PWD/lake   (until it has caught up, then SIGTERM)" >&2
rm -rf lake
scripts/lib/venv.sh
"$SLOTLAKE" run --source "$SOURCE" --slot demo --publication demo --sink "file://$PWD/lake" \
  --flush-interval 1s --metrics-addr 127.0.0.1:0 &
RUN_PID=$!
target=$(pg_value "SELECT pg_current_wal_insert_lsn()")
until [ "$(pg_value "SELECT confirmed_flush_lsn >= '$target' FROM pg_replication_slots WHERE slot_name = 'demo'")" = t ]; do
  kill -0 "$RUN_PID" 2>/dev/null || { echo "error: slotlake run stopped" >&2; exit 1; }
  sleep 0.2
done
echo "== slotlake compact   (change logs -> current (SCD1) and history (SCD2) tables)" >&2
"$SLOTLAKE" compact --sink "file://$PWD/lake"
echo "== slotlake verify    (the lake against a snapshot of the live source)" >&2
"$SLOTLAKE" verify --source "$SOURCE" --slot demo --publication demo --sink "file://$PWD/lake"
kill -TERM "$RUN_PID"
wait "$RUN_PID"

echo "== the change log of public.orders, read by Python deltalake (not slotlake)" >&2
.venv/bin/python scripts/lib/read_delta.py "file://$PWD/lake/changes/public/orders"
echo "== the current table of public.customers (SCD1), read by Python deltalake" >&2
.venv/bin/python scripts/lib/read_delta.py "file://$PWD/lake/current/public/customers"
echo "== its history table (SCD2): customer 2 became 3 (a key change), leaving a tombstone" >&2
.venv/bin/python scripts/lib/read_delta.py "file://$PWD/lake/history/public/customers"
echo "== the lake:" >&2
find lake -name '*.json' -path '*_delta_log*' | sort

echo "== slotlake slot drop --drop-publication" >&2
"$SLOTLAKE" slot drop --source "$SOURCE" --slot demo --publication demo --drop-publication
echo "== done (the lake stays in ./lake)" >&2
