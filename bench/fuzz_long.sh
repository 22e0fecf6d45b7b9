#!/usr/bin/env bash
# Long schemathesis run: the CI fuzz test with more examples per endpoint and mode (default 1000).
#   bash bench/fuzz_long.sh [EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_EXAMPLES="${1:-1000}" exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 3600 \
    tests/test_fuzz_schemathesis.py
