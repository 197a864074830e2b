#!/usr/bin/env bash
# The newcomer's demo: a throwaway PostgreSQL with logical WAL, a slot and publication made by
# slotlake, some changes, and `slotlake tail` printing them decoded, as JSON lines.
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

echo "== slotlake slot drop --drop-publication" >&2
"$SLOTLAKE" slot drop --source "$SOURCE" --slot demo --publication demo --drop-publication
echo "== done" >&2
