#!/bin/bash
# One device call (tool `run`, carry [".whl"] and, for a comparison, [".old"]) that checks the GPU paths:
#   * with .old/ (an older tree: `git archive <rev> quarkmoe_jax kernels | tar -x -C .old`, plus the link
#     .old/quarkmoe_jax/kernels -> ../kernels where that tree had none), every backend's outputs under both
#     trees, compared bit for bit
#     (scripts/backend_outputs.py), in the background;
#   * the Triton, backend-selection, layout, Pallas and whole-model GPU tests named by PYTEST_K (default: all).
#   * with BENCH=1 first (alone on the GPU): the module path (QuarkMoEBlock, backend auto, laid out as the
#     load lays it) at Mixtral T=1 (BENCH_SCHEMES, default w_mxfp4), under .old (if present) and this tree
#     (benchmarks/moe_bench.py --module, CUPTI), with the pallas and triton rows beside it.
# Writes logs, JSON and .npz files under $OUT. T: seconds for each part (default 250).
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
# A source tree run without installing: kernels/ is the subpackage quarkmoe_jax.kernels through pyproject's
# package mapping, which only an install applies; the device copy of the tree gets the link instead.
[ -e quarkmoe_jax/kernels ] || ln -s ../kernels quarkmoe_jax/kernels
python3 -m pip install -q --no-deps --target /tmp/site .whl/jax_triton-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax, triton, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
T=${T:-250}
if [ "${BENCH:-0}" = 1 ]; then
  bench="--shapes mixtral --tokens 1 --schemes ${BENCH_SCHEMES:-w_mxfp4} --backends pallas triton --module --no-baselines --repeats 50"
  for tree in old new; do
    root=$PWD; [ $tree = old ] && root=$PWD/.old
    [ -d "$root" ] || continue
    PYTHONPATH=/tmp/site:$root timeout 200 python3 $root/benchmarks/moe_bench.py $bench --json $OUT/module_$tree.json \
      > $OUT/module_$tree.log 2>&1
    echo "module timing ($tree tree) rc=$?"; tail -8 $OUT/module_$tree.log
  done
fi
if [ -d .old ]; then
  old_script=scripts/backend_outputs.py; [ -f .old/scripts/backend_outputs.py ] && old_script=.old/scripts/backend_outputs.py
  (PYTHONPATH=/tmp/site:$PWD/.old timeout $((T + 10)) python3 $old_script $OUT/old.npz > $OUT/old.log 2>&1) &
  (PYTHONPATH=/tmp/site:$PWD timeout $((T + 10)) python3 scripts/backend_outputs.py $OUT/new.npz > $OUT/new.log 2>&1) &
fi
# Without the flag XLA:GPU skips bfloat16 roundings the oracle writes (tests/models/test_models_gpu.py).
XLA_FLAGS=--xla_allow_excess_precision=false PYTHONPATH=/tmp/site:$PWD timeout -s INT $T python3 -m pytest -q -n ${N:-6} -p no:cacheprovider -rfE \
  tests/moe/test_triton.py tests/moe/test_backend_selection.py tests/formats/test_kernel_layout.py tests/formats/test_fragment_layout.py \
  tests/moe/test_pallas.py tests/models/test_models_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; tail -20 $OUT/pytest.log
wait
if [ -d .old ]; then
  python3 scripts/backend_outputs.py --compare $OUT/old.npz $OUT/new.npz --common | tail -12
fi
