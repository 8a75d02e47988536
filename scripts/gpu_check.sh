#!/bin/bash
# One device call (tool `run`, carry [".whl"] and, for a comparison, [".old"]) that checks the GPU paths:
#   * with .old/ (an older tree: `git archive <rev> quarkmoe_jax kernels | tar -x -C .old` plus the link
#     .old/quarkmoe_jax/kernels -> ../kernels), every backend's outputs under both trees, compared bit for bit
#     (scripts/backend_outputs.py), in the background;
#   * the Triton tests, the layout tests and the Pallas tests named by PYTEST_K (default: all of them).
# Writes logs and .npz files under $OUT. T: seconds for each part (default 250).
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
python3 -m pip install -q --no-deps --target /tmp/site .whl/jax_triton-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, triton, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
T=${T:-250}
if [ -d .old ]; then
  (PYTHONPATH=/tmp/site:$PWD/.old timeout $((T + 10)) python3 scripts/backend_outputs.py $OUT/old.npz > $OUT/old.log 2>&1) &
  (PYTHONPATH=/tmp/site:$PWD timeout $((T + 10)) python3 scripts/backend_outputs.py $OUT/new.npz > $OUT/new.log 2>&1) &
fi
PYTHONPATH=/tmp/site:$PWD timeout -s INT $T python3 -m pytest -q -n ${N:-6} -p no:cacheprovider -rfE \
  tests/moe/test_triton.py tests/formats/test_kernel_layout.py tests/formats/test_fragment_layout.py \
  tests/moe/test_pallas.py ${PYTEST_K:+-k "$PYTEST_K"} > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; tail -20 $OUT/pytest.log
wait
if [ -d .old ]; then
  python3 scripts/backend_outputs.py --compare $OUT/old.npz $OUT/new.npz --common | tail -12
fi
