-- slotlake's bookkeeping on the source: a schema and the record of applied migrations.
-- Applied by `slotlake setup` (idempotent: safe to run again).
CREATE SCHEMA IF NOT EXISTS slotlake;
COMMENT ON SCHEMA slotlake IS 'slotlake bookkeeping (managed by slotlake setup)';
CREATE TABLE IF NOT EXISTS slotlake.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
