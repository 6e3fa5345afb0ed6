#!/usr/bin/env bash
# Make sure PostgreSQL (server + psql) and the pgAudit extension are installed, from Debian's
# packages, for the pgAudit end-to-end test (tests/e2e/test_pgaudit_bypass.py).
#
# Idempotent and quick when everything is there (no apt call at all). Installs only what is
# missing, with the distribution's own apt sources: the PostgreSQL major version already
# installed decides the pgAudit package (postgresql-<major>-pgaudit); with no server at all,
# `postgresql` (the distribution's default major) is installed first.
#
# `--check`: install nothing, only tell (exit 0 ready, 1 not).
# Exit codes: 0 ready; 1 missing and could not be installed (not root, no apt-get, apt failed).
# `make test` runs this with `-` (continue on failure): the test itself then fails in CI
# (CI=true) with this script's message, and is skipped with that reason elsewhere.
set -uo pipefail

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }

# The installed PostgreSQL majors, newest first (Debian layout: /usr/lib/postgresql/<major>/bin).
majors() {
    local d
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$d" ] || continue
        d=${d#/usr/lib/postgresql/}
        printf '%s\n' "${d%%/*}"
    done | sort -rn
}

has_pgaudit() { [ -f "/usr/lib/postgresql/$1/lib/pgaudit.so" ] && \
    [ -f "/usr/share/postgresql/$1/extension/pgaudit.control" ]; }

ready() {
    local major
    major=$(majors | head -n1)
    [ -n "$major" ] && has_pgaudit "$major" && command -v psql >/dev/null 2>&1
}

if ready; then
    log "PostgreSQL $(majors | head -n1) with pgAudit: installed"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then  # only tell, install nothing
    log "PostgreSQL with pgAudit is not installed (run deploy/ci/ensure-postgres.sh as root)"
    exit 1
fi

if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL with pgAudit is missing and this is not root: cannot install it" \
        "(as root: apt-get install postgresql postgresql-<major>-pgaudit)"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "PostgreSQL with pgAudit is missing and there is no apt-get: install PostgreSQL and" \
        "pgAudit by hand"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # one `apt-get update` per run, only when something must be installed
    if [ -z "${_APT_UPDATED:-}" ]; then
        apt-get update -qq >/dev/null || { log "apt-get update failed"; return 1; }
        _APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ -z "$(majors)" ]; then
    log "installing PostgreSQL (Debian's default version)"
    apt_install postgresql postgresql-client || { log "could not install postgresql"; exit 1; }
fi
major=$(majors | head -n1)
if [ -z "$major" ]; then
    log "no PostgreSQL server under /usr/lib/postgresql after installing it"
    exit 1
fi
if ! command -v psql >/dev/null 2>&1; then
    apt_install "postgresql-client-$major" || { log "could not install psql"; exit 1; }
fi
if ! has_pgaudit "$major"; then
    log "installing pgAudit for PostgreSQL $major"
    apt_install "postgresql-$major-pgaudit" || {
        log "could not install postgresql-$major-pgaudit"; exit 1; }
fi
if ready; then
    log "PostgreSQL $major with pgAudit: installed"
    exit 0
fi
log "PostgreSQL $major with pgAudit: still incomplete after installing"
exit 1
