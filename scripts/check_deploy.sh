#!/usr/bin/env bash
# Lints and validates the deployment files; no Docker daemon needed. Runs every check, prints one
# line per check (plus the tool's output on failure), exits non-zero if any check failed.
# Tools: hadolint and kubernetes-validate (wheels in .venv), promtool and `docker compose` or
# docker-compose (scripts/install_system_deps.sh installs promtool and docker-compose), and kubectl
# where present (its built-in kustomize only: no cluster is contacted).
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
out=$(mktemp)
empty_env=$(mktemp)
dotenv=$(mktemp)
runenv=$(mktemp)
built=$(mktemp)
trap 'rm -f "$out" "$empty_env" "$dotenv" "$runenv" "$built"' EXIT

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

# Every NAME=VALUE of an example reaches the neuronguard service as `config` resolves it (the two
# directory variables become its volume sources), and the example sets the patch source.
reaches_service() {
    local file=$1 resolved name value
    [[ -s $file ]] || { echo "no NEURONGUARD_* variables found in the example"; return 1; }
    grep -q '^NEURONGUARD_PATCH_SOURCE=' "$file" || { echo "the example leaves NEURONGUARD_PATCH_SOURCE unset"; return 1; }
    resolved=$("${COMPOSE[@]}" --env-file "$file" -f docker-compose.yml config) || return 1
    while IFS='=' read -r name value; do
        case $name in
            NEURONGUARD_MODELS_DIR|NEURONGUARD_BUNDLES_DIR) grep -qF -- "- $value:/" <<<"$resolved" ;;
            *) grep -qF -- "$name: $value" <<<"$resolved" ;;
        esac || { echo "$name=$value does not reach the service"; return 1; }
    done <"$file"
}

HADOLINT=$(need hadolint) || exit 2
PROMTOOL=$(need promtool) || exit 2
KUBECTL=$(command -v kubectl || true)  # optional: tests/test_kubernetes_manifests.py validates each file without it
KUBERNETES_VALIDATE=$(need kubernetes-validate) || exit 2
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=("$(need docker-compose)") || exit 2
fi

# The examples of docs/deployment.md: the `.env` block and the real checkpoint's `docker run -e` line.
sed -n '/^# \.env$/,/^```$/p' docs/deployment.md | grep '^NEURONGUARD_' >"$dotenv"
grep -o -- '-e NEURONGUARD_[A-Z_]*=[^ ]*' docs/deployment.md | sed 's/^-e //' >"$runenv"

# Any finding, down to "info", fails: the Dockerfile carries inline ignores where one is intended.
check "Dockerfile (hadolint)" "$HADOLINT" --no-color Dockerfile
# `config` interpolates, schema-validates and resolves the file as `up` would. A developer's .env
# must not change the result, hence the empty env file.
check "docker-compose.yml (${COMPOSE[*]} config)" \
    "${COMPOSE[@]}" --env-file "$empty_env" -f docker-compose.yml config --quiet
check "docs/deployment.md .env example (${COMPOSE[*]} config)" reaches_service "$dotenv"
check "docs/deployment.md docker run variables (${COMPOSE[*]} config)" reaches_service "$runenv"
check "prometheus.yml (promtool check config)" \
    "$PROMTOOL" check config deploy/prometheus/prometheus.yml
check "alerts.yml (promtool check rules)" \
    "$PROMTOOL" check rules deploy/prometheus/alerts.yml
# Rule files in the test are resolved relative to the test file.
check "alerts_test.yml (promtool test rules)" \
    "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
# What `kubectl apply -k deploy/kubernetes` would send, built offline, then checked strictly against
# the newest schemas kubernetes-validate bundles (the PodMonitor CRD only warns: the tests check it).
if [[ -n $KUBECTL ]]; then
    check "deploy/kubernetes (kubectl kustomize)" \
        bash -c '"$1" kustomize deploy/kubernetes >"$2"' _ "$KUBECTL" "$built"
    check "deploy/kubernetes (kubernetes-validate --strict)" \
        "$KUBERNETES_VALIDATE" --strict --quiet "$built"
else
    echo "skip  deploy/kubernetes (kubectl kustomize): kubectl not found"
    check "deploy/kubernetes (kubernetes-validate --strict, per file)" \
        bash -c 'for f in deploy/kubernetes/*.yaml; do [[ $f == */kustomization.yaml ]] || "$1" --strict --quiet "$f" || exit 1; done' _ "$KUBERNETES_VALIDATE"
fi

exit "$failed"
