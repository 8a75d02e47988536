"""The serving engine against the model's own generate: paged attention equals the contiguous forward, every
request's greedy output equals generate on it alone (any arrival schedule, chunking, preemption), per-request
seeds, bad requests refused while the others are served, and a steady state that compiles nothing.

Small engines (few token and sequence buckets) so each architecture compiles a handful of programs once.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quarkmoe_jax import QuarkMoEError
from quarkmoe_jax.models import from_pretrained
from quarkmoe_jax.models.paged import PagedBatch
from quarkmoe_jax.serving import Engine, SamplingParams, generate
from quarkmoe_jax.serving import engine as engine_module

HF_MODELS = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data" / "hf_models"
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
_models: dict = {}


def model_of(arch: str):
    if arch not in _models:
        _models[arch] = from_pretrained(HF_MODELS / arch, backend="emulation")
    return _models[arch]


def small_engine(model, **overrides) -> Engine:
    """Two sequences and 8 tokens a step: one token bucket and two sequence buckets to compile."""
    settings = dict(max_num_seqs=2, max_num_batched_tokens=8, block_size=4, max_model_len=48, num_blocks=24)
    return Engine(model, **{**settings, **overrides})


def reference(model, prompt, new_tokens, stop=()):
    """``generate`` on the prompt alone, cut after the first stop token (prompts of 9-16 tokens and 17-32
    positions in all share generate's compiled prefill and decode step)."""
    out = model.generate(np.asarray([prompt]), new_tokens, eos_token_id=list(stop))[0, len(prompt) :].tolist()
    for i, token in enumerate(out):
        if token in stop:
            return out[: i + 1]
    return out


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss"])  # latent attention; windows + sinks
def test_paged_steps_equal_the_contiguous_forward(arch):
    """Two sequences through blocks of 4 in scattered block order: a prompt split over two steps (a chunk ending
    mid-block, the next crossing two blocks) and a prompt then one decode token; padding tokens write nothing."""
    model = model_of(arch)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, model.config.vocab_size, 9), rng.integers(0, model.config.vocab_size, 4)
    block_size, num_blocks = 4, 12
    tables = np.array([[5, 2, 9, 0], [7, 1, 0, 0]], np.int32)
    cache = model.init_paged_cache(num_blocks, block_size)

    def step(rows, n):
        ids, seq, pos = [], [], []
        for row, tokens, start in rows:
            ids += list(tokens)
            seq += [row] * len(tokens)
            pos += list(range(start, start + len(tokens)))
        pad = n - len(ids)
        slots = [tables[s, p // block_size] * block_size + p % block_size for s, p in zip(seq, pos, strict=True)]
        last = np.cumsum([len(tokens) for _, tokens, _ in rows]) - 1
        batch = PagedBatch(
            jnp.asarray(seq + [0] * pad, jnp.int32),
            jnp.asarray(pos + [0] * pad, jnp.int32),
            jnp.asarray(slots + [num_blocks * block_size] * pad, jnp.int32),
            jnp.asarray(tables),
            jnp.asarray(last, jnp.int32),
            jnp.asarray([True] * len(ids) + [False] * pad),
        )
        return paged_logits(jnp.asarray(ids + [0] * pad, jnp.int32), batch, cache)

    graphdef, state = nnx.split(model)
    paged_logits = jax.jit(lambda ids, batch, cache: nnx.merge(graphdef, state).paged_logits(ids, batch, cache))

    logits, cache = step([(0, first[:6], 0), (1, second, 0)], 16)
    expected = [np.asarray(model(first[None, :6]))[0, -1], np.asarray(model(second[None]))[0, -1]]
    assert len(first) == 9 and len(second) == block_size  # a block-sized sequence, a chunk ending mid-block
    scale = max(np.abs(e).max() for e in expected)
    for found, want in zip(np.asarray(logits), expected, strict=True):
        np.testing.assert_allclose(found, want, atol=2e-6 * scale)
    token = int(np.argmax(expected[1]))
    logits, cache = step([(0, first[6:], 6), (1, [token], 4)], 8)
    expected = [np.asarray(model(first[None]))[0, -1], np.asarray(model(np.asarray([[*second, token]])))[0, -1]]
    for found, want in zip(np.asarray(logits), expected, strict=True):
        np.testing.assert_allclose(found, want, atol=2e-6 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_request_gets_what_generate_gives_it_alone(arch):
    """Requests arrive while others run (a seeded schedule), long prompts are chunked, and a cache of one whole
    context forces preemptions; each request's tokens equal generate on its prompt alone. Mixtral runs the GPU's
    token buckets (steps of 1, 2, 4 and 8 slots), the others the CPU's (8)."""
    model = model_of(arch)
    rng = np.random.default_rng(ARCHS.index(arch))
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(9, 17, 4)]  # 2 chunks each
    new_tokens = [int(n) for n in rng.integers(8, 13, 4)]
    # one whole context of 32 in blocks of 4: two requests of 17-28 positions cannot both hold theirs
    engine = small_engine(model, max_model_len=32, num_blocks=8, min_step_tokens=1 if arch == "mixtral" else None)
    assert engine.step_buckets() == ([1, 2, 4, 8] if arch == "mixtral" else [8])
    arrivals = sorted(rng.integers(0, 4, 4).tolist())
    produced, ids, finished, step = {}, {}, set(), 0
    while len(ids) < len(prompts) or engine.has_unfinished():
        for i, arrival in enumerate(arrivals):
            if arrival == step and i not in ids:
                ids[i] = engine.add_request(prompts[i], SamplingParams(new_tokens[i], stop_token_ids=()))
                produced[ids[i]] = []
        for output in engine.step():
            assert output.request_id not in finished
            produced[output.request_id] += output.new_token_ids
            if output.finished:
                finished.add(output.request_id)
        step += 1
    assert engine.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert produced[ids[i]] == reference(model, prompt, new_tokens[i]), i
    assert engine.scheduler.allocator.num_free == engine.num_blocks  # every block came back


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])  # windows + sinks; q/k norms and GQA groups of 2
def test_the_paged_attention_kernel_serves_what_generate_gives(arch):
    """The engine on the Pallas paged attention kernel (the interpreter here, compiled on a GPU): a prompt that
    spans blocks of 16, chunked, and a request that joins while the first decodes."""
    model = model_of(arch)
    engine = small_engine(model, block_size=16, num_blocks=6, attention_backend="pallas")
    assert engine.attention_backend == "pallas" and "attention: pallas" in engine.summary()
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (19, 5)]
    first = engine.add_request(prompts[0], SamplingParams(6, stop_token_ids=()))
    produced = {first: []}
    for _ in range(3):
        for output in engine.step():
            produced[output.request_id] += output.new_token_ids
    second = engine.add_request(prompts[1], SamplingParams(6, stop_token_ids=()))
    produced[second] = []
    while engine.has_unfinished():
        for output in engine.step():
            produced[output.request_id] += output.new_token_ids
    assert produced[first] == reference(model, prompts[0], 6)
    assert produced[second] == reference(model, prompts[1], 6)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_async_scheduling_serves_what_waiting_for_each_step_serves(arch):
    """The next step launched before the last one's tokens are back (its decode tokens read on the device):
    the same tokens and logprobs as steps that wait, through stop tokens met while a further token is already
    launched, preemptions, an abort in flight and sampled requests; outputs come one call later."""
    model = model_of(arch)
    rng = np.random.default_rng(21)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(3, 20, 8)]
    free_run = reference(model, prompts[0], 10)
    params = [
        SamplingParams(10, stop_token_ids=[free_run[4]]),  # stops at its 5th token (or before)
        SamplingParams(7, temperature=0.9, top_k=20, seed=3, stop_token_ids=(), logprobs=2),
        *(
            SamplingParams(int(n), stop_token_ids=(int(s),))
            for n, s in zip(rng.integers(3, 12, 6), rng.integers(0, vocab, 6), strict=True)
        ),
    ]
    prompts[1] = prompts[0]
    runs = {}
    for async_scheduling in (False, True):
        # one whole context of 32 positions: two requests of 17-31 positions cannot both hold theirs
        engine = small_engine(model, max_model_len=32, num_blocks=8, async_scheduling=async_scheduling)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        produced = {request_id: [] for request_id in ids}
        first = engine.step()
        assert (first == []) == async_scheduling  # a launched step's outputs come with the next call
        calls = 1
        for out in first:
            produced[out.request_id].append(out)
        while engine.has_unfinished():
            for out in engine.step():
                produced[out.request_id].append(out)
            calls += 1
            if calls == 6:
                engine.abort_request(ids[-1])  # in flight with async scheduling: its token is dropped
        assert engine.scheduler.allocator.num_free == engine.num_blocks and engine.num_preemptions > 0
        runs[async_scheduling] = [
            [(o.new_token_ids, o.finished, o.logprobs) for o in produced[request_id]] for request_id in ids
        ]
    assert runs[True] == runs[False]
    tokens = [[t for new, _, _ in outs for t in new] for outs in runs[True]]
    assert tokens[0] == free_run[: free_run.index(free_run[4]) + 1] and runs[True][0][-1][1]
    assert len(tokens[1]) == 7 and all(lp is not None for _, _, lp in runs[True][1])


def test_an_attention_backend_the_model_cannot_run_is_refused():
    with pytest.raises(QuarkMoEError, match="attention_backend='pallas': .*block_size a power of two >= 16, got 4"):
        small_engine(model_of("mixtral"), attention_backend="pallas")
    with pytest.raises(QuarkMoEError, match="key part 1's head dim a power of two >= 16, got 8"):
        small_engine(model_of("deepseek_v3"), block_size=16, num_blocks=3, attention_backend="pallas")
    assert small_engine(model_of("deepseek_v3")).attention_backend == "xla"


def test_stop_tokens_end_a_request_and_are_kept():
    model = model_of("mixtral")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    free_run = reference(model, prompt, 10)
    stop = free_run[3]
    engine = small_engine(model)
    (out,) = generate(model, [prompt], SamplingParams(10, stop_token_ids=[stop]), engine=engine)
    assert out == free_run[: free_run.index(stop) + 1]


def test_a_request_s_seed_decides_its_tokens_whatever_the_batch():
    model = model_of("gpt_oss")
    engine = small_engine(model)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (7, 3, 12)]  # engine.max_num_seqs 2
    params = [
        SamplingParams(8, temperature=0.8, top_p=0.9, top_k=30, seed=seed, stop_token_ids=()) for seed in (11, 12, 13)
    ]
    together = generate(model, prompts, params, engine=engine)
    alone = [generate(model, [prompt], p, engine=engine)[0] for prompt, p in zip(prompts, params, strict=True)]
    assert together == alone
    again = generate(model, prompts[:1], SamplingParams(8, temperature=0.8, seed=11, stop_token_ids=()), engine=engine)
    other = generate(model, prompts[:1], SamplingParams(8, temperature=0.8, seed=99, stop_token_ids=()), engine=engine)
    assert again != other  # the seed matters (8 sampled tokens from 96 agree by chance with probability ~0)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_model_s_own_distribution(temperature):
    """Each new token's logprob and its step's top-k are log_softmax of the contiguous forward's logits (before
    temperature); asking for them changes no token; k = 0 gives the chosen token's logprob alone."""
    model = model_of("qwen2_moe")
    engine = small_engine(model)
    prompt = [4, 8, 15, 16, 23, 42, 7, 9, 11]
    plain = SamplingParams(6, temperature=temperature, seed=3, stop_token_ids=())
    asked = SamplingParams(6, temperature=temperature, seed=3, stop_token_ids=(), logprobs=3)
    request_ids = [engine.add_request(prompt, asked), engine.add_request(prompt, plain)]
    outputs = {request_id: [] for request_id in request_ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    with_logprobs, without = (outputs[r] for r in request_ids)
    tokens = [o.new_token_ids[0] for o in with_logprobs]
    assert tokens == [o.new_token_ids[0] for o in without] and all(o.logprobs is None for o in without)
    logits = model(np.asarray([prompt + tokens]))[0, len(prompt) - 1 : -1]
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for step, (out, token) in enumerate(zip(with_logprobs, tokens, strict=True)):
        (record,) = out.logprobs
        assert record.token_id == token
        np.testing.assert_allclose(record.logprob, want[step, token], atol=2e-4)
        assert [t for t, _ in record.top] == np.argsort(-want[step])[:3].tolist()
        np.testing.assert_allclose([lp for _, lp in record.top], np.sort(want[step])[::-1][:3], atol=2e-4)
    if temperature == 0:
        assert tokens == reference(model, prompt, 6)
    (only,) = generate(model, [prompt], SamplingParams(1, logprobs=0), engine=engine)
    request_id = engine.add_request(prompt, SamplingParams(1, logprobs=0))
    (out,) = [o for _ in range(3) for o in engine.step() if o.request_id == request_id]  # a 9-token prompt: 2 steps
    assert out.logprobs[0].top == () and out.new_token_ids == [only[0]] == [int(np.argmax(want[0]))]


GOOD_PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(4), r"prompt_ids must hold at least one token"),
        ([1, 96], SamplingParams(4), r"prompt_ids must be in \[0, 96\)"),
        ([1.5, 2], SamplingParams(4), r"prompt_ids must be an integer array"),
        ("hello", SamplingParams(4), r"tokenize the text first"),
        ([1] * 40, SamplingParams(9), r"max_new_tokens 9 = 49 positions, more than the model's context of 48"),
        ([1, 2], SamplingParams(4, stop_token_ids=[500]), r"stop_token_ids must be token ids in \[0, 96\), found int"),
        ([1, 2], {"max_new_tokens": 4}, r"params must be a SamplingParams"),
    ],
)
def test_a_bad_request_is_refused_and_the_others_are_served(prompt, params, message):
    model = model_of("mixtral")
    engine = small_engine(model)
    good = engine.add_request(GOOD_PROMPT, SamplingParams(8, stop_token_ids=()))
    with pytest.raises(QuarkMoEError, match=message) as refused:
        engine.add_request(prompt, params)
    assert refused.value.field in ("prompt_ids", "max_new_tokens", "stop_token_ids", "params")
    produced = []
    while engine.has_unfinished():
        produced += [t for out in engine.step() if out.request_id == good for t in out.new_token_ids]
    assert produced == reference(model, GOOD_PROMPT, 8)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_new_tokens", 0, "max_new_tokens must be a positive integer"),
        ("temperature", -0.5, "temperature must be 0"),
        ("temperature", float("nan"), "temperature must be finite"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("top_k", -1, "top_k must be a non-negative integer"),
        ("seed", 2**70, "seed must be an integer"),
        ("stop_token_ids", "2", "stop_token_ids must be a list"),
        ("logprobs", 21, r"logprobs must be None or an integer in \[0, 20\]"),
        ("logprobs", True, r"logprobs must be None or an integer"),
    ],
)
def test_sampling_params_name_the_bad_field(field, value, message):
    with pytest.raises(QuarkMoEError, match=message) as refused:
        SamplingParams(**{field: value})
    assert refused.value.field == field


def test_after_warm_up_serving_compiles_nothing():
    """warm_up compiles one program per token bucket and greedy / sampled; then no workload compiles again
    (prompts of every length the engine takes, chunked and not, greedy and sampled, batches of 1 and 2)."""
    model = model_of("qwen3_moe")
    engine = small_engine(model, max_num_batched_tokens=16)
    assert engine.step_buckets() == [8, 16]
    before = engine_module._engine_step._cache_size()
    assert engine.warm_up() > 0
    compiled = engine_module._engine_step._cache_size()
    assert compiled - before <= 4
    greedy, sampled = SamplingParams(6, stop_token_ids=()), SamplingParams(4, temperature=0.8, top_k=5, seed=1)
    for prompts in ([[7, 8]], [[9, 10, 11], [1] * 20], [[12] * 30, [3, 4]]):
        generate(model, prompts, greedy, engine=engine)
        generate(model, prompts, sampled, engine=engine)
        generate(model, prompts, SamplingParams(3, logprobs=2), engine=engine)
    assert engine_module._engine_step._cache_size() == compiled
    again = small_engine(model, max_num_batched_tokens=16)  # a second engine over the same model: same programs
    generate(model, [[7, 8]], greedy, engine=again)
    assert engine_module._engine_step._cache_size() == compiled


def test_offline_generate_keeps_the_prompts_order_and_checks_them_all_first():
    model = model_of("mixtral")
    engine = small_engine(model)
    prompts = [list(range(1, 17)), list(range(20, 30)), list(range(40, 52))]
    params = [SamplingParams(n, stop_token_ids=()) for n in (2, 9, 8)]
    out = generate(model, prompts, params, engine=engine)
    assert [len(o) for o in out] == [2, 9, 8]
    assert out == [reference(model, p, n.max_new_tokens) for p, n in zip(prompts, params, strict=True)]
    with pytest.raises(QuarkMoEError, match=r"prompts\[1\]: prompt_ids must be in"):
        generate(model, [[1], [1000]], SamplingParams(2), engine=engine)
    assert not engine.has_unfinished()  # the good prompt queued before the bad one was dropped
    with pytest.raises(QuarkMoEError, match="one SamplingParams or one per prompt"):
        generate(model, [[1], [2]], [SamplingParams(2)], engine=engine)


def test_engine_defaults_work_and_the_cache_is_sized_and_described():
    model = model_of("mixtral")
    engine = Engine(model)
    assert engine.context.length == model.config.max_position_embeddings
    assert engine.num_blocks >= engine.blocks_per_request
    assert "KV cache:" in engine.summary() and "blocks" in engine.summary()
    assert "scheduling: async;" in engine.summary()
    assert engine.summary().endswith(f"steps of 8 to {engine.step_buckets()[-1]} token slots")  # the CPU's default
    engine.async_scheduling = False
    assert "scheduling: waiting for each step;" in engine.summary()
    for bad, message in ((3, "must be a power of two"), (0, "must be a positive integer")):
        with pytest.raises(QuarkMoEError, match=f"min_step_tokens {message}") as refused:
            Engine(model, min_step_tokens=bad)
        assert refused.value.field == "min_step_tokens"
    with pytest.raises(QuarkMoEError, match="async_scheduling must be True or False"):
        Engine(model, async_scheduling="yes")
    with pytest.raises(QuarkMoEError, match="cannot hold one request"):
        Engine(model, num_blocks=1)
    for bad in (0, 1.5, float("nan"), "0.9", True):
        with pytest.raises(QuarkMoEError, match=r"memory_fraction must be in \(0, 1\]"):
            Engine(model, memory_fraction=bad)
    with pytest.raises(QuarkMoEError, match="max_num_seqs must be a positive integer"):
        Engine(model, max_num_seqs=0)
