#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the tests (the job store's suite, the cluster test) and for
# trying a deployment on one machine: a fresh data folder, trust authentication on 127.0.0.1 only.
#
#   eval "$(bash scripts/postgres.sh start /tmp/kt-pg)"   # exports KINETOSCOPE_TEST_POSTGRES
#   bash scripts/postgres.sh stop /tmp/kt-pg              # stops it and removes the folder
#
# POSTGRES_TLS=on makes a server that takes TLS connections only, with a certificate for 127.0.0.1 from a CA made
# for it; it prints KINETOSCOPE_TEST_POSTGRES_TLS (sslmode=require) and PGSSLROOTCERT (the CA) instead.
# POSTGRES_FSYNC=on keeps PostgreSQL's durability (commits synced, as a real deployment's are), for benchmarks.
# The server comes from the OS packages (scripts/install-deps.sh installs them). PostgreSQL refuses to run as
# root, so as root it runs as the packages' `postgres` user.
set -euo pipefail

action=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -x "$bin/initdb" ] || { echo "no PostgreSQL server under /usr/lib/postgresql: run scripts/install-deps.sh" >&2; exit 1; }

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "$action" in
start)
    mkdir -p "$dir"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir"
    # A port nobody listens on.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    # fsync off by default: the data is thrown away; the tests check behaviour, not this server's durability.
    options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir"
    options="$options -c fsync=${POSTGRES_FSYNC:-off} -c max_connections=300"
    if [ "${POSTGRES_TLS:-off}" = on ]; then
        # A CA, and a certificate for 127.0.0.1 it signs; only TLS connections are taken over TCP.
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kinetoscope test CA" \
            -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\n' >"$dir/san.ext"
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
            -extfile "$dir/san.ext" -out "$dir/server.pem" 2>/dev/null
        chmod 600 "$dir/server.key"
        [ "$(id -u)" -ne 0 ] || chown postgres: "$dir/server.key" "$dir/server.pem"
        printf 'local all all trust\nhostssl all all 127.0.0.1/32 trust\n' >"$dir/hba.conf"
        [ "$(id -u)" -ne 0 ] || chown postgres: "$dir/hba.conf"
        options="$options -c ssl=on -c ssl_cert_file=$dir/server.pem -c ssl_key_file=$dir/server.key"
        options="$options -c hba_file=$dir/hba.conf"
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o "$options" \
        >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    if [ "${POSTGRES_TLS:-off}" = on ]; then
        echo "export KINETOSCOPE_TEST_POSTGRES_TLS='postgres://postgres@127.0.0.1:$port/postgres?sslmode=require'"
        echo "export PGSSLROOTCERT=$dir/ca.pem"
    else
        echo "export KINETOSCOPE_TEST_POSTGRES=postgres://postgres@127.0.0.1:$port/postgres"
    fi
    ;;
stop)
    [ ! -d "$dir/data" ] || as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
