# Sourced by tools/demo and tools/test: make (or refresh) the project's virtual environment.
# Installs the CPU build torch==2.13.0 when no torch is present: a bare "torch" requirement
# would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHCI_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "meshci: creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.meshci-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "meshci: installing torch==2.13.0 (CPU build)" >&2
        "$VENV/bin/pip" install -q torch==2.13.0
    fi
    echo "meshci: installing meshci and its test dependencies" >&2
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
