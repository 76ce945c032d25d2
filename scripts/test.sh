#!/usr/bin/env bash
# Create .venv with the dev extra (once) and run the whole test suite.
#   scripts/test.sh            all tests
#   scripts/test.sh -k beam    extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv dev

# The browser test drives Debian's Chromium; install it when we can (root, apt), never download one.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo ">> installing chromium and chromium-driver for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
        || echo "!! could not install chromium; the browser test will be skipped" >&2
fi

python -m ruff check captioner tests scripts benchmarks
python -m pytest -q "$@"
