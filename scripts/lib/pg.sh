# shellcheck shell=bash
#
# scripts/lib/pg.sh — a throwaway PostgreSQL server for scripts (benchmarks, demos).
#
# Source it from a bash script that runs with `set -euo pipefail`:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib/pg.sh"
#     PG_USER=bench pg_start shared_buffers=256MB     # initdb + start, extra settings optional
#     pg_psql -c 'CREATE TABLE t (id int PRIMARY KEY)'
#     conn=$(pg_conninfo unix)                         # or: pg_conninfo tcp
#
# pg_start creates a private directory, runs initdb (trust authentication, no fsync), starts the
# server on a free port on 127.0.0.1 and a Unix socket in that directory, and creates the
# database $PG_DB. It installs an EXIT trap (and INT/TERM traps that exit through it) that runs
# pg_stop: the server is stopped with `pg_ctl stop -m immediate` and the directory removed, so no
# server outlives the script, whether it succeeds, fails or is interrupted. A caller that needs
# its own EXIT trap sets it after pg_start and calls pg_stop from it.
#
# The server runs with wal_level=logical, 10 replication slots and WAL senders, and durability
# off (fsync, synchronous_commit, full_page_writes): it is thrown away, and loads are faster.
# Arguments to pg_start are extra `name=value` postgresql.conf settings and override these.
#
# initdb refuses to run as root: when the script runs as root, initdb, pg_ctl and postgres run
# as the `postgres` user (runuser), and the directory is chowned to it. Clients (psql, the tools
# under test) run as the caller and reach the server over the socket or TCP with trust auth.
#
# Inputs (environment, all optional):
#   SLOTLAKE_PG_BIN  directory of the PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   PG_USER          superuser created by initdb (default slotlake)
#   PG_DB            database created and used by pg_psql / pg_conninfo (default $PG_USER)
#   PG_OS_USER       OS user that owns the server when running as root (default postgres)
#   PG_KEEP=1        leave the directory in place on exit (the server is still stopped)
#
# Set by pg_start:
#   PG_BIN       the binaries directory
#   PG_DIR       the private directory; callers may keep scratch files in it (removed on exit)
#   PG_DATA      the data directory ($PG_DIR/data)
#   PG_SOCKDIR   the Unix socket directory ($PG_DIR)
#   PG_HOST      127.0.0.1
#   PG_PORT      the port (TCP and the socket's name)
#   PG_LOG       the server log ($PG_DIR/server.log)

PG_BIN=${SLOTLAKE_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_USER=${PG_USER:-slotlake}
PG_DB=${PG_DB:-$PG_USER}
PG_OS_USER=${PG_OS_USER:-postgres}
PG_HOST=127.0.0.1
PG_DIR=
PG_DATA=
PG_SOCKDIR=
PG_PORT=
PG_LOG=

# Messages go to stderr so that stdout stays the caller's.
pg_log() { printf '%s\n' "$*" >&2; }
pg_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a server-side binary (initdb, pg_ctl, postgres) as the server's owner, from $PG_DIR so
# that the owner never needs access to the caller's working directory.
_pg_as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@")
    else
        (cd "$PG_DIR" && "$@")
    fi
}

# Prints a TCP port on 127.0.0.1 that nothing listens on (pg_start retries if it is taken
# between this check and the server's bind).
pg_free_port() {
    local port _
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (: <>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    pg_die "no free TCP port found on 127.0.0.1"
}

# pg_start [name=value ...] — see the header.
pg_start() {
    local bin setting attempt
    [[ -z $PG_DIR ]] || pg_die "pg_start: a server is already running in $PG_DIR"
    for bin in initdb pg_ctl postgres psql; do
        [[ -x $PG_BIN/$bin ]] || pg_die "$PG_BIN/$bin not found (set SLOTLAKE_PG_BIN to the PostgreSQL bin directory)"
    done
    if [[ $(id -u) -eq 0 ]]; then
        command -v runuser >/dev/null || pg_die "running as root needs runuser to start PostgreSQL as $PG_OS_USER"
        id -u "$PG_OS_USER" >/dev/null 2>&1 || pg_die "running as root needs an OS user '$PG_OS_USER' to own the server (set PG_OS_USER)"
    fi

    # The trap comes first: a failure anywhere below still cleans up.
    trap pg_stop EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/slotlake-pg.XXXXXX")
    [[ $PG_DIR != *[[:space:]]* ]] || pg_die "temporary directory $PG_DIR contains whitespace; set TMPDIR"
    PG_DATA=$PG_DIR/data
    PG_SOCKDIR=$PG_DIR
    PG_LOG=$PG_DIR/server.log
    if [[ $(id -u) -eq 0 ]]; then
        chown "$PG_OS_USER" "$PG_DIR"
        runuser -u "$PG_OS_USER" -- test -w "$PG_DIR" \
            || pg_die "$PG_OS_USER cannot write $PG_DIR (is ${TMPDIR:-/tmp} reachable by $PG_OS_USER? set TMPDIR)"
    fi

    _pg_as_owner "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U "$PG_USER" --no-sync \
        -E UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; pg_die "initdb failed"; }

    {
        printf "\n# pg.sh\n"
        printf "listen_addresses = '%s'\n" "$PG_HOST"
        printf "unix_socket_directories = '%s'\n" "$PG_SOCKDIR"
        printf "wal_level = 'logical'\n"
        printf "max_replication_slots = '10'\n"
        printf "max_wal_senders = '10'\n"
        printf "fsync = 'off'\n"
        printf "synchronous_commit = 'off'\n"
        printf "full_page_writes = 'off'\n"
        for setting in "$@"; do
            [[ $setting == *=* ]] || pg_die "pg_start: setting '$setting' is not name=value"
            printf "%s = '%s'\n" "${setting%%=*}" "${setting#*=}"
        done
    } >>"$PG_DATA/postgresql.conf"

    for attempt in 1 2 3 4 5; do
        PG_PORT=$(pg_free_port)
        if _pg_as_owner "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
            -o "-p $PG_PORT" >/dev/null 2>&1; then
            break
        fi
        if ((attempt < 5)) && grep -q 'could not bind\|could not create any TCP/IP sockets' "$PG_LOG" 2>/dev/null; then
            pg_log "port $PG_PORT was taken; retrying"
            continue
        fi
        tail -n 30 "$PG_LOG" >&2 2>/dev/null || true
        pg_die "PostgreSQL did not start (log above, from $PG_LOG)"
    done

    if [[ $PG_DB != postgres ]]; then
        pg_psql -d postgres -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
    fi
}

# pg_stop — stops the server (immediate shutdown) and removes $PG_DIR. Idempotent; the EXIT trap
# of pg_start calls it.
pg_stop() {
    local pid
    [[ -n $PG_DIR ]] || return 0
    if [[ -f $PG_DATA/postmaster.pid ]]; then
        if ! _pg_as_owner "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30 >/dev/null 2>&1; then
            # pg_ctl failed: stop the postmaster we started by its pid (SIGQUIT = immediate).
            pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)
            if [[ $pid =~ ^[0-9]+$ ]]; then
                kill -QUIT "$pid" 2>/dev/null || true
                sleep 1
            fi
        fi
    fi
    if [[ ${PG_KEEP:-0} == 1 ]]; then
        pg_log "kept $PG_DIR"
    else
        rm -rf -- "$PG_DIR"
    fi
    PG_DIR=
}

# pg_psql [psql args ...] — psql as $PG_USER to $PG_DB over the Unix socket: no psqlrc, quiet,
# stops at the first error. A later -d overrides the database.
pg_psql() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKDIR" -p "$PG_PORT" -U "$PG_USER" \
        -d "$PG_DB" "$@"
}

# pg_value SQL — prints the single value SQL returns (unaligned, tuples only).
pg_value() {
    pg_psql -A -t -c "$1"
}

# pg_conninfo unix|tcp — a libpq key=value connection string for $PG_DB as $PG_USER, over the
# Unix socket or TCP on 127.0.0.1 (without TLS: the server has none).
pg_conninfo() {
    case ${1:-unix} in
        unix) printf 'host=%s port=%s user=%s dbname=%s\n' "$PG_SOCKDIR" "$PG_PORT" "$PG_USER" "$PG_DB" ;;
        tcp) printf 'host=%s port=%s user=%s dbname=%s sslmode=disable\n' "$PG_HOST" "$PG_PORT" "$PG_USER" "$PG_DB" ;;
        *) pg_die "pg_conninfo: transport must be unix or tcp, not '$1'" ;;
    esac
}
