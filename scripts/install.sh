#!/usr/bin/env bash
# Create .venv with Python 3.12 and install quarkmoe-jax (editable, with the dev extra) pinned to the GPU
# image's versions (constraints.txt). Usage: bash scripts/install.sh [VENV_DIR] [--newest]
# --newest: no pins, the newest versions pip resolves within pyproject.toml's ranges (what `pip install .`
# gives a user); CI tests both.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
pins=(-c constraints.txt)
if [ "${2:-}" = "--newest" ]; then pins=(); fi
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
"$venv/bin/python" -m pip install --quiet "${pins[@]}" -e ".[dev]"
"$venv/bin/python" -c 'import jax, quarkmoe_jax; import flax, ml_dtypes, numpy; print("installed quarkmoe-jax", quarkmoe_jax.__version__, "with jax", jax.__version__, "flax", flax.__version__, "ml_dtypes", ml_dtypes.__version__, "numpy", numpy.__version__)'
