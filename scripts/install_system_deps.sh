#!/usr/bin/env bash
# Installs the Debian packages the deployment checks need:
#   prometheus      -> promtool (config/rule checks, rule unit tests) and the Prometheus server
#   docker-compose  -> `docker-compose config`, a full parse + schema validation of docker-compose.yml
#                      (no Docker daemon needed)
# Idempotent: exits at once when every package is installed; otherwise runs `apt-get update` once
# and installs what is missing. Quiet on success, loud (full apt output, non-zero exit) on failure.
set -euo pipefail

PACKAGES=(prometheus docker-compose)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install_system_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "install_system_deps: failed: $*" >&2
        exit 1
    fi
}

run "${SUDO[@]}" apt-get update -q
run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"

for tool in promtool prometheus docker-compose; do
    command -v "$tool" >/dev/null || { echo "install_system_deps: $tool missing after install" >&2; exit 1; }
done
