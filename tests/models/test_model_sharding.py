"""Whole models over a mesh of 8 host devices (``from_pretrained(mesh=)``) against the same model on one device.

Every architecture on the layouts the issue names (data x expert x tensor = 1 x 1 x 8, 1 x 4 x 2, 2 x 2 x 2) and
expert parallelism alone (1 x 8 x 1), float and quantized (MXFP4, INT8): logits equal to one device's within
float32 summation order (the all-reduce after ``o_proj`` and GEMM2 adds partial sums in another order, and XLA
fuses the partitioned program's replicated parts its own way); greedy ``generate`` and the engine give the same
tokens. Float32 models, so that the comparison is strict.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax import cli
from quarkmoe_jax.checkpoint import safetensors_io
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
from quarkmoe_jax.errors import InputError, QuarkMoEError
from quarkmoe_jax.models import from_pretrained
from quarkmoe_jax.moe.sharding import MoESharding, moe_mesh
from quarkmoe_jax.serving import Engine, SamplingParams, generate
from tests.conftest import RUN_SEED, run_on_8_host_devices
from tests.models.test_models import ARCHS

ENOUGH_DEVICES = len(jax.devices()) >= 8
needs_8 = pytest.mark.skipif(not ENOUGH_DEVICES, reason="needs 8 devices (run by test_on_8_host_devices)")
VOCAB = 100  # padded to 128 on a mesh: the padding's logits must be dropped


@pytest.mark.skipif(ENOUGH_DEVICES or jax.default_backend() != "cpu", reason="this process has the devices")
def test_on_8_host_devices():
    """This file's tests in a fresh process with 8 host devices (the count is fixed when JAX starts)."""
    run_on_8_host_devices(__file__)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(arch, scheme=None)``: a synthetic checkpoint with 8 query heads (so that 8 tensor shards split
    them) and 2 key / value heads (replicated over more than 2 shards, as vLLM does), made once."""
    made = {}

    def get(arch, scheme=None):
        if (arch, scheme) not in made:
            root = tmp_path_factory.mktemp(f"{arch}_{scheme}")
            path = write_float_checkpoint(root / "float", arch, num_heads=8, num_kv_heads=2, vocab_size=VOCAB)
            if scheme is not None:
                path = export_quark_checkpoint(path, root / "quantized", scheme, quantize_linears=True)
            made[arch, scheme] = path
        return made[arch, scheme]

    return get


def _mesh(layout: str):
    data, expert, tensor = map(int, layout.split("x"))
    return moe_mesh(data=data, expert=expert, tensor=tensor)


def _ids(seed=0):
    return np.random.default_rng([RUN_SEED, seed]).integers(0, VOCAB, (2, 7)).astype(np.int32)


LAYOUTS = ["1x1x8", "1x4x2", "2x2x2"]
CASES = [(arch, LAYOUTS[i % 3], None) for i, arch in enumerate(ARCHS)] + [
    ("mixtral", "1x8x1", None),  # experts alone
    ("mixtral", "1x4x2", "w_mxfp4"),
    ("gpt_oss", "1x1x8", "w_mxfp4_a_mxfp4"),
    ("qwen3_moe", "2x2x2", "w8a8_int8_channel_dynamic_token"),
]

GENERATE = {CASES[0], CASES[1], CASES[2], ("mixtral", "1x8x1", None)}  # each layout once (compiles are the cost)


@needs_8
@pytest.mark.parametrize("arch, layout, scheme", CASES)
def test_a_model_over_the_mesh_equals_one_device(checkpoints, arch, layout, scheme):
    path = checkpoints(arch, scheme)
    one = from_pretrained(path, dtype=jnp.float32)
    many = from_pretrained(path, dtype=jnp.float32, mesh=_mesh(layout))
    ids = _ids()
    want, got = np.asarray(one(ids)), np.asarray(many(ids))
    assert got.shape == want.shape == (2, 7, VOCAB)
    # Not bit for bit even with experts split alone: partial sums over tensor shards or experts add in another
    # order, and XLA fuses the partitioned program's replicated parts its own way (jax 0.12 differs by an ulp).
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    if (arch, layout, scheme) in GENERATE:
        np.testing.assert_array_equal(many.generate(ids, 4), one.generate(ids, 4))
    embed = many.embed_tokens.get_value()
    tp = int(layout.split("x")[2])
    assert embed.shape[0] == (128 if tp > 1 else VOCAB) and len(embed.sharding.device_set) == 8
    if layout == "1x4x2" and arch != "deepseek_v3":  # 2 key / value heads over 2 tensor shards: one each
        cache = many.init_cache(2, 16)[0]["k"]
        assert cache.shape[2] == 2 and cache.addressable_shards[0].data.shape[2] == 1
    if tp > 1:  # one device holds its slice of the vocabulary and of the query heads
        assert embed.addressable_shards[0].data.shape[0] == 128 // tp
        q = many.layers[0].self_attn.q_b_proj if arch == "deepseek_v3" else many.layers[0].self_attn.q_proj
        w = q.weight.get_value()
        w = getattr(w, "values", w)
        assert w.addressable_shards[0].data.shape[0] == w.shape[0] // tp


@needs_8
def test_the_engine_over_the_mesh_serves_what_one_device_serves(checkpoints):
    """Continuous batching with chunked prefill over EP 2 x TP 4: the model's 2 key / value heads are fewer than
    the tensor shards, so each is stored twice and every device's paged cache holds the one head its query
    heads read (vLLM's layout; TP 2 splits them as they are: the model test's 1 x 4 x 2 layout)."""
    path = checkpoints("qwen2_moe")
    one = from_pretrained(path, dtype=jnp.float32, max_model_len=64)
    many = from_pretrained(path, dtype=jnp.float32, max_model_len=64, mesh=_mesh("1x2x4"))
    rng = np.random.default_rng([RUN_SEED, 3])
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 17, 3, 30)]
    params = SamplingParams(6, stop_token_ids=())
    settings = dict(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=32)
    engine = Engine(many, **settings)
    assert engine.attention_backend == "xla"
    want = generate(one, prompts, params, engine=Engine(one, **settings))
    assert generate(many, prompts, params, engine=engine) == want
    k = engine.cache[0]["k"]  # [blocks, block_size, 2 heads x 2 copies, D]
    assert k.shape[2] == 4 and k.addressable_shards[0].data.shape[2] == 1 and len(k.sharding.device_set) == 8
    with pytest.raises(InputError, match="does not run on a mesh"):
        Engine(many, attention_backend="pallas", **settings)


@needs_8
def test_tensors_are_read_per_shard(checkpoints, monkeypatch):
    """Every split tensor is read in slices from the memory map: the only whole reads are the replicated routers."""
    whole = []
    read = safetensors_io.CheckpointReader.__getitem__
    monkeypatch.setattr(
        safetensors_io.CheckpointReader, "__getitem__", lambda self, name: whole.append(name) or read(self, name)
    )
    from_pretrained(checkpoints("deepseek_v3"), dtype=jnp.float32, mesh=_mesh("1x4x2"))
    assert whole and all(name.split(".mlp.gate.")[-1] in ("weight", "e_score_correction_bias") for name in whole)


@needs_8
def test_a_split_vllm_cannot_run_is_refused(checkpoints, tmp_path):
    path = write_float_checkpoint(tmp_path / "six", "mixtral", num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    with pytest.raises(QuarkMoEError, match="cannot hold this model: 4 attention heads do not split over TP 8"):
        from_pretrained(path, mesh=_mesh("1x1x8"))
    sharding = MoESharding(_mesh("1x4x2"), placement="round_robin", exchange="all_gather")
    model = from_pretrained(checkpoints("mixtral"), dtype=jnp.float32, mesh=sharding)  # the experts' settings kept
    assert model.layers[0].mlp.experts.sharding == sharding


@needs_8  # run once, in the 8-device process (its workers start with 4 host devices each)
def test_two_processes_hold_one_mesh_as_two_hosts_would(checkpoints, tmp_path):
    """Multi-host: two processes (4 host devices each, ``jax.distributed`` over localhost, gloo collectives)
    load one EP 4 x TP 2 mesh, each reading only its own devices' shards; both see the one-device logits."""
    path = checkpoints("mixtral")
    ids = _ids(5)
    out = tmp_path / "run"
    np.save(f"{out}_ids.npy", ids)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("QUARKMOE_HOST_DEVICES", None)
    root = pathlib.Path(__file__).parents[2]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.models.multihost_worker", str(i), "2", port, str(path), str(out)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
    one = from_pretrained(path, dtype=jnp.float32)
    want = np.asarray(one(ids))
    for i in range(2):
        got = np.load(f"{out}_{i}.npz")
        np.testing.assert_allclose(got["logits"], want, rtol=0, atol=2e-6 * np.abs(want).max())
        np.testing.assert_array_equal(got["tokens"], one.generate(ids, 4))


@needs_8
def test_quarkmoe_generate_runs_over_a_mesh(checkpoints, capsys):
    args = ["generate", str(checkpoints("mixtral")), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "4"]
    args += ["--dtype", "float32"]
    assert cli.main(args) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if "new ids" in line]
    assert cli.main([*args, "--mesh", "1x4x2"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "new ids" in line] == alone != []


@needs_8
def test_the_serving_benchmark_runs_over_a_mesh(tmp_path, monkeypatch):
    """benchmarks/serve_bench.py --mesh (what a multi-GPU machine runs): a tiny shape over EP 2 x TP 2."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
    monkeypatch.setattr(sys, "path", sys.path)
    import serve_bench

    out = tmp_path / "serve.json"
    args = ["--shapes", "tiny_mixtral", "--layers", "2", "--batches", "2", "--repeats", "1", "--context", "16"]
    args += ["--copy-tbps", "0.01", "--requests", "3", "--concurrency-requests", "0", "--max-num-seqs", "4"]
    args += ["--max-num-batched-tokens", "32", "--mesh", "1x2x2", "--json", str(out)]
    args += ["--prefill-tokens", "40", "--matmul-tflops", "0.01"]
    assert serve_bench.main(args) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert "skipped" not in result, result
    assert result["mesh"] == "1x2x2" and result["throughput"]["output_tokens_per_s"] > 0
    assert result["decode"][0]["compiled_while_timed"] == 0 and result["prefill"]["tokens_per_s"] > 0
