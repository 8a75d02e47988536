#!/usr/bin/env bash
# Create .venv with Python 3.12 and install quarkmoe-jax (editable, with the dev extra) pinned to the GPU
# image's versions. Usage: bash scripts/install.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python=""
for candidate in "env PYENV_VERSION=3.12.1 python3.12" "python3.12" "python3"; do
  if $candidate -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    python="$candidate"; break
  fi
done
if [ -z "$python" ]; then
  echo "install.sh: no Python 3.12 found (JAX 0.11 needs it); install one or set PYENV_VERSION" >&2
  exit 1
fi
rm -rf "$venv"
$python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
"$venv/bin/python" -c 'import jax, quarkmoe_jax; print("installed quarkmoe-jax", quarkmoe_jax.__version__, "with jax", jax.__version__)'
