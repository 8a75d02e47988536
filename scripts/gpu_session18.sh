#!/bin/bash
# One device call (tool `run`, carry [".whl"]); each part runs when its time limit (seconds) is set above 0:
#   T   the quantized Linear on the kernel backends, compiled, against the oracle (tests/models/test_linear_kernels.py)
#   X   the v2 MX kernel launched through XLA's Triton custom call (QUARKMOE_TRITON_LAUNCHER=xla) against the
#       oracle: tests/moe/test_triton.py's MX cases
#   V   the v3 kernel (epilogue in the kernel, QUARKMOE_MX_FUSED_EPILOGUE=1): its test against v2, then the
#       backend suite's MX cases through it
#   TP  the decode step with MXFP4 attention projections on the kernel GEMM (step_profile, 8 Mixtral layers),
#       once per launcher in $LAUNCHERS (default: jax_triton)
#   M   moe_bench w_mxfp4 (triton) at T = 1, 16 for gpt-oss and Mixtral, once per launcher:fused pair in
#       $VARIANTS (default "jax_triton:0"; e.g. "jax_triton:0 jax_triton:1 xla:0 xla:1")
#   TS  HTTP overhead, the engine in its own process (quarkmoe serve's way; serve_bench --http, 8 layers)
#   TT  the same with the engine on the server's thread (the same-GPU comparison)
# e.g. T=80 X=150 V=150 bash scripts/gpu_session18.sh; then M=60 VARIANTS="jax_triton:0 jax_triton:1 xla:0 xla:1";
# TP=80 LAUNCHERS="jax_triton xla"; TS=380; TT=300.
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
[ -e quarkmoe_jax/kernels ] || ln -s ../kernels quarkmoe_jax/kernels
python3 -m pip install -q --no-deps --target /tmp/site .whl/jax_triton-*.whl .whl/serve/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${T:-0}" -gt 0 ]; then
  timeout $T python3 -m pytest -q -p no:cacheprovider -rfE tests/models/test_linear_kernels.py > $OUT/linear_pytest.log 2>&1
  echo "linear pytest rc=$?"; tail -4 $OUT/linear_pytest.log
fi
if [ "${X:-0}" -gt 0 ]; then
  QUARKMOE_TRITON_LAUNCHER=xla timeout $X python3 -m pytest -q -p no:cacheprovider -rfE -x tests/moe/test_triton.py \
    -k "mxfp4 or mxfp6 or v2_kernel or interleaved" > $OUT/xla_launch_pytest.log 2>&1
  echo "xla-launch pytest rc=$?"; tail -4 $OUT/xla_launch_pytest.log
fi
if [ "${V:-0}" -gt 0 ]; then
  QUARKMOE_MX_FUSED_EPILOGUE=1 timeout $V python3 -m pytest -q -p no:cacheprovider -rfE tests/moe/test_triton.py \
    -k "v3_epilogue or mxfp4 or mxfp6 or interleaved or activations" > $OUT/v3_pytest.log 2>&1
  echo "v3 pytest rc=$?"; tail -4 $OUT/v3_pytest.log
fi
if [ "${TP:-0}" -gt 0 ]; then
  A="--shape mixtral_8x7b --layers 8 --batch 1 --steps 30 --scheduling async --attention-scheme w_mxfp4"
  for launcher in ${LAUNCHERS:-jax_triton}; do
    QUARKMOE_TRITON_LAUNCHER=$launcher timeout $TP python3 benchmarks/step_profile.py $A \
      --json $OUT/p_mx_kernel_$launcher.json > $OUT/p_mx_kernel_$launcher.log 2>&1
    rc=$?; echo "profile ($launcher) rc=$rc"; grep -E "^async|host per step" $OUT/p_mx_kernel_$launcher.log
    [ $rc = 0 ] || tail -6 $OUT/p_mx_kernel_$launcher.log
  done
fi
if [ "${M:-0}" -gt 0 ]; then
  for variant in ${VARIANTS:-jax_triton:0}; do
    launcher=${variant%:*}; fused=${variant#*:}
    QUARKMOE_TRITON_LAUNCHER=$launcher QUARKMOE_MX_FUSED_EPILOGUE=$fused timeout $M python3 benchmarks/moe_bench.py \
      --shapes gpt_oss mixtral --tokens 1 16 --schemes w_mxfp4 --backends triton --no-baselines \
      --json $OUT/moe_${launcher}_$fused.json > $OUT/moe_${launcher}_$fused.log 2>&1
    echo "moe_bench ($launcher, fused $fused) rc=$?"; grep -E "triton" $OUT/moe_${launcher}_$fused.log | tail -4
  done
fi
for mode in process thread; do
  limit=$([ $mode = process ] && echo ${TS:-0} || echo ${TT:-0}); [ "$limit" -gt 0 ] || continue
  timeout $limit python3 benchmarks/serve_bench.py --shapes mixtral_8x7b --layers 8 --http --http-engine $mode \
    --requests 200 --concurrency-requests 16 --batches 1 --prefill-tokens 0 --max-num-batched-tokens 512 \
    --json $OUT/serve_http_$mode.json > $OUT/serve_http_$mode.log 2>&1
  echo "serve ($mode) rc=$?"; tail -8 $OUT/serve_http_$mode.log
done
