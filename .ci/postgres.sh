#!/usr/bin/env bash
# Install Debian's PostgreSQL, start a server on localhost and create a throw-away test database,
# for tests/test_review_store.py (the `postgres` marker). Runs as root (CI containers) or via sudo.
#
#   eval "$(.ci/postgres.sh)"
#
# Prints `export MEDVIT_TEST_PG_URL=...` on stdout for eval; progress goes to stderr.
set -euo pipefail

PG_DB="${PG_DB:-medvit_test}"
PG_USER="${PG_USER:-medvit}"
PG_PASSWORD="${PG_PASSWORD:-medvit}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v pg_lsclusters >/dev/null 2>&1; then
  echo "installing postgresql (Debian)..." >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi

PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"
if ! pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "${PG_VERSION}/main"; then
  $SUDO pg_createcluster "${PG_VERSION}" main >&2
fi
if ! pg_lsclusters -h | awk -v v="${PG_VERSION}" '$1==v && $2=="main"{print $4}' | grep -qx online; then
  echo "starting PostgreSQL ${PG_VERSION}/main..." >&2
  $SUDO pg_ctlcluster "${PG_VERSION}" main start >&2
fi
PG_PORT="$(pg_lsclusters -h | awk -v v="${PG_VERSION}" '$1==v && $2=="main"{print $3}')"

psql_admin() { $SUDO runuser -u postgres -- psql -p "${PG_PORT}" -v ON_ERROR_STOP=1 -qtA "$@"; }
for _ in $(seq 1 30); do psql_admin -c "select 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(psql_admin -c "select 1 from pg_roles where rolname='${PG_USER}'")" != "1" ]; then
  psql_admin -c "create role ${PG_USER} login password '${PG_PASSWORD}'" >&2
fi
if [ "$(psql_admin -c "select 1 from pg_database where datname='${PG_DB}'")" != "1" ]; then
  psql_admin -c "create database ${PG_DB} owner ${PG_USER}" >&2
fi

MEDVIT_TEST_PG_URL="postgresql+psycopg2://${PG_USER}:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/${PG_DB}"
export MEDVIT_TEST_PG_URL
echo "PostgreSQL ready: ${MEDVIT_TEST_PG_URL}" >&2
echo "export MEDVIT_TEST_PG_URL=${MEDVIT_TEST_PG_URL}"
