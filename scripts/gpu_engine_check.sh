#!/bin/bash
# One device call for the engine (tool `run`, carry [".whl"]): the paged attention kernel and the engine,
# compiled on the GPU, against the XLA oracle and offline generate (tests/models/test_paged_attention.py,
# tests/serving/test_engine.py); then, with ATTN=1, benchmarks/attention_bench.py; with SERVE="<args>",
# benchmarks/serve_bench.py <args>; with PROFILE="<args>", benchmarks/step_profile.py <args> (a decode step's
# kernels by source line and the host's time by phase, async and sync scheduling; PTAG / STAG name their files, to run
# several variants in one call). Logs and JSON under $OUT. T, TA, TS, TP: seconds per part.
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
[ -e quarkmoe_jax/kernels ] || ln -s ../kernels quarkmoe_jax/kernels
python3 -m pip install -q --no-deps --target /tmp/site .whl/jax_triton-*.whl 2>&1 | tail -1
# the serve extra (serve_bench --http), where the image lacks it: wheels carried in .whl/serve, made here with
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
#     -d .whl/serve -c constraints.txt fastapi uvicorn jinja2 prometheus-client tokenizers httpx opentelemetry-api
# (drop what the image already has: huggingface_hub, fsspec, filelock, tqdm, pyyaml, packaging, hf_xet)
[ -d .whl/serve ] && python3 -m pip install -q --no-deps --target /tmp/site .whl/serve/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  timeout -s INT ${T:-180} python3 -m pytest -q -n ${N:-4} -p no:cacheprovider -rfE \
    tests/models/test_paged_attention.py tests/serving/test_engine.py > $OUT/engine_pytest.log 2>&1
  echo "engine pytest rc=$?"; tail -25 $OUT/engine_pytest.log
fi
if [ "${ATTN:-0}" = 1 ]; then
  timeout ${TA:-150} python3 benchmarks/attention_bench.py --json $OUT/attention.json > $OUT/attention.log 2>&1
  echo "attention_bench rc=$?"; tail -14 $OUT/attention.log
fi
if [ -n "$SERVE" ]; then
  S=${STAG:-serve}
  timeout ${TS:-400} python3 benchmarks/serve_bench.py $SERVE --json $OUT/$S.json > $OUT/$S.log 2>&1
  echo "serve_bench $S rc=$?"; tail -30 $OUT/$S.log
fi
if [ -n "$PROFILE" ]; then
  P=${PTAG:-profile}
  timeout ${TP:-240} python3 benchmarks/step_profile.py $PROFILE --json $OUT/$P.json > $OUT/$P.log 2>&1
  echo "step_profile $P rc=$?"; grep -E "^(async|sync)|host per step" $OUT/$P.log
fi
