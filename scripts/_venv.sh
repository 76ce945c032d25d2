# Sourced by demo.sh and test.sh: create .venv once and (re)install when pyproject.toml changes.
# Usage: ensure_venv EXTRAS   (e.g. "serve" or "dev")
set -euo pipefail

ensure_venv() {
    local extras="$1"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="$root/.venv"
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "captioner needs Python >= 3.10 (found: $("$py" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo ">> creating $venv"
        "$py" -m venv "$venv"
    fi
    local stamp="$venv/.captioner-installed-$extras"
    local want
    want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo ">> installing captioner[$extras] into $venv (first run: a few minutes)"
        "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$venv/bin/python" -m pip install -q -e "$root[$extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
