"""What a caller gives a whole model (``model(...)``, ``init_cache``, ``generate``) is checked before anything is
allocated: every refusal is one :class:`~quarkmoe_jax.errors.InputError` (a ``QuarkMoEError``) naming the
argument; whatever is accepted gives valid tokens and finite logits (a hypothesis fuzz of ``generate``).

One tiny model (transformers' random Mixtral: vocabulary 96, context 64, two layers) serves every test; the
refusals run no forward, and the fuzz's valid draws share one prompt bucket and one cache length, so the
module compiles a handful of programs."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from quarkmoe_jax import QuarkMoEError
from quarkmoe_jax.errors import InputError
from quarkmoe_jax.models import QuarkMoEForCausalLM, from_pretrained, inputs

MIXTRAL = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data" / "hf_models" / "mixtral"
VOCAB, CONTEXT = 96, 64


@pytest.fixture(scope="module")
def model():
    model = from_pretrained(MIXTRAL, backend="emulation")
    assert model.config.vocab_size == VOCAB and model.context.length == CONTEXT
    return model


@pytest.fixture(scope="module")
def cache8(model):
    return model.init_cache(1, 8)


def _fail(*args, **kwargs):
    raise AssertionError("allocated or ran before refusing")


@pytest.fixture
def no_forward(monkeypatch):
    """A refusal must come before any forward."""
    monkeypatch.setattr(QuarkMoEForCausalLM, "hidden_states", _fail)


@pytest.fixture
def no_allocation(monkeypatch, no_forward):
    """... and before the KV cache is allocated."""
    monkeypatch.setattr(QuarkMoEForCausalLM, "_allocate_cache", _fail)


PROMPT = np.array([[1, 2, 3]], np.int32)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (np.ones((1, 3), np.float32), r"integer array \[B, T\], got float32"),
        (np.ones((1, 3), bool), r"integer array \[B, T\], got bool"),
        (np.array([1, 2, 3]), r"integer array \[B, T\], got int64 \(3,\)"),
        (np.ones((1, 1, 3), np.int32), r"integer array \[B, T\]"),
        ("1,2,3", r"integer array \[B, T\], got <U5"),
        ([[1], [1, 2]], "inhomogeneous"),
        (np.zeros((0, 3), np.int32), r"at least one sequence of at least one token, got shape \(0, 3\)"),
        (np.zeros((1, 0), np.int32), r"got shape \(1, 0\)"),
        (np.array([[1, -1]]), r"input_ids must be in \[0, 96\), found values in \[-1, 1\]"),
        (np.array([[1, 96]]), r"must be in \[0, 96\)"),
        (np.array([[2**40]]), r"found values in \[1099511627776, 1099511627776\]"),
        (np.array([[2**64 - 1]], np.uint64), r"must be in \[0, 96\)"),
        ([[2**70]], "beyond 64 bits"),
        (np.ones((1, 65), np.int32), "65 tokens, more than the model's context of 64 positions"),
        (np.ones((1, 5000), np.int32), "5000 tokens, more than the model's context of 64"),
    ],
)
def test_bad_token_ids_are_refused_by_every_entry(model, cache8, no_allocation, input_ids, message):
    with pytest.raises(InputError, match=message):
        model.generate(input_ids, 2)
    with pytest.raises(InputError, match=message):
        model(input_ids)
    with pytest.raises(InputError, match=message):
        model(input_ids, cache=cache8, start=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative integer, got int -1"),
        ({"max_new_tokens": True}, "non-negative integer, got bool True"),
        ({"max_new_tokens": 2.0}, "non-negative integer, got float 2.0"),
        ({"max_new_tokens": "3"}, "non-negative integer, got str '3'"),
        ({"max_new_tokens": 62}, r"3 tokens \+ max_new_tokens 62 = 65 positions, more than the model's context of 64"),
        ({"max_new_tokens": 10**9}, "max_new_tokens 1000000000 = 1000000003 positions"),
        ({"max_new_tokens": 2**70}, "more than the model's context"),
        ({"temperature": float("nan")}, "temperature must be finite, got float nan"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"temperature": 10**400}, "temperature must be finite"),
        ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or in"),
        ({"temperature": 1e-39}, r"temperature must be 0 \(greedy\) or in \[1.18e-38"),
        ({"temperature": 1e39}, "temperature must be 0"),
        ({"temperature": "0.5"}, "temperature must be a number, got str"),
        ({"temperature": True}, "temperature must be a number, got bool"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, "top_p must be finite"),
        ({"top_p": None}, "top_p must be a number, got NoneType"),
        ({"temperature": 0.7}, "needs an explicit PRNG key"),
        ({"temperature": 0.7, "key": 0}, r"key must be a jax PRNG key \(jax.random.key\(seed\)\), got int 0"),
        ({"temperature": 0.7, "key": "seed"}, "key must be a jax PRNG key"),
        ({"temperature": 0.7, "key": jax.random.split(jax.random.key(0))}, r"one PRNG key.*got key<fry> \(2,\)"),
        ({"temperature": 0.7, "key": np.zeros(3, np.uint32)}, r"got uint32 \(3,\)"),
        ({"key": jnp.zeros(2, jnp.float32)}, r"got float32 \(2,\)"),  # checked when given, greedy or not
        ({"eos_token_id": 96}, r"eos_token_id must be token ids in \[0, 96\), found int 96"),
        ({"eos_token_id": [1, -1]}, "found int -1"),
        ({"eos_token_id": [1, 2.0]}, "found float 2.0"),
        ({"eos_token_id": True}, "eos_token_id must be a token id or a list of token ids, got bool"),
        ({"eos_token_id": "2"}, "got str '2'"),
    ],
)
def test_bad_generation_arguments_are_refused_before_allocating(model, no_allocation, kwargs, message):
    kwargs = {"max_new_tokens": 2} | kwargs
    with pytest.raises(InputError, match=message):
        model.generate(PROMPT, **kwargs)


def test_the_context_is_max_model_len_when_set_and_the_cache_must_fit_memory(model, monkeypatch, no_allocation):
    monkeypatch.setattr(model, "max_model_len", 4)
    assert model.context == (4, "max_model_len")
    with pytest.raises(
        InputError, match=r"3 tokens \+ max_new_tokens 2 = 5 positions, .* 4 positions \(max_model_len\)"
    ):
        model.generate(PROMPT, 2)
    with pytest.raises(InputError, match="5 tokens, more than the model's context of 4"):
        model(np.ones((1, 5), np.int32))
    # a context larger than the config's is the caller's call; the KV cache must still fit the device
    monkeypatch.setattr(model, "max_model_len", 10**13)
    with pytest.raises(InputError, match=r"a KV cache of 1 x \d+ positions takes .* GiB, more than"):
        model.generate(PROMPT, 10**12 - 100)
    with pytest.raises(InputError, match=r"a KV cache of 1000000 x 10000000 positions"):
        model.init_cache(10**6, 10**7)
    for bad in ({"batch": 0}, {"length": True}, {"length": 2.5}):
        with pytest.raises(InputError, match="must be a positive integer"):
            model.init_cache(**({"batch": 1, "length": 8} | bad))
    with pytest.raises(InputError, match="float dtype"):
        model.init_cache(1, 8, jnp.int32)
    with pytest.raises(InputError, match="max_model_len must be a positive integer, got int 0"):
        from_pretrained(MIXTRAL, max_model_len=0)  # before any weight is read


def test_a_config_without_max_position_embeddings_gets_the_default_context(model):
    config = model.config.__class__(**{**model.config.__dict__, "max_position_embeddings": None})
    assert inputs.context_of(config) == (inputs.DEFAULT_CONTEXT, inputs.context_of(config).source)
    assert "max_model_len sets one" in inputs.context_of(config).source
    assert inputs.context_of(config, 100_000).length == 100_000
    with pytest.raises(InputError, match=f"context of {inputs.DEFAULT_CONTEXT} positions"):
        inputs.check_generation(config, PROMPT, inputs.DEFAULT_CONTEXT)


def test_cache_bytes_are_what_init_cache_allocates(model):
    expected = jax.eval_shape(lambda: model.init_cache(3, 16, jnp.bfloat16))
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(expected))
    assert inputs.cache_bytes(model.config, 3, 16, jnp.bfloat16) == nbytes


@pytest.mark.parametrize(
    "make_cache, start, message",
    [
        (lambda m: m.init_cache(1, 8), 7, r"start 7 \+ 2 tokens = 9 positions, more than the cache's 8"),
        (lambda m: m.init_cache(1, 8), -1, "start must be >= 0, got -1"),
        (lambda m: m.init_cache(1, 8), 1.0, r"start must be an integer \(the position of input_ids\[:, 0\]\)"),
        (lambda m: m.init_cache(1, 8), True, "start must be an integer"),
        (lambda m: m.init_cache(1, 8), np.array([0, 1]), r"integer scalar, got int64 \(2,\)"),
        (lambda m: m.init_cache(1, 8), np.int64(2**40), "more than the cache's 8"),
        (lambda m: m.init_cache(1, 128), 63, "65 positions, more than the model's context of 64"),
        (lambda m: m.init_cache(2, 8), 0, r"cache\[0\]\['k'\] is float32 \(2, 8, 2, 16\), expected float32 \(1, 8"),
        (lambda m: m.init_cache(1, 8)[:1], 0, "a list of 2 dicts, got list of 1"),
        (lambda m: [m.init_cache(1, 8)[0], m.init_cache(1, 16)[1]], 0, r"cache\[1\]\['k'\] is .* \(1, 16, 2, 16\)"),
        (lambda m: [m.init_cache(1, 8)[0], {"k": m.init_cache(1, 8)[1]["k"]}], 0, r"keys \['k', 'v'\], got \['k'\]"),
        (lambda m: [{"k": np.zeros((1, 8, 2, 16), np.int32)}] * 2, 0, "not a dict of float arrays"),
        (lambda m: {"k": 1}, 0, "a list of 2 dicts, got dict"),
        (lambda m: 5, 0, "got int"),
    ],
)
def test_a_cached_call_checks_the_cache_and_start(model, no_forward, make_cache, start, message):
    with pytest.raises(InputError, match=message):
        model(PROMPT[:, :2], cache=make_cache(model), start=start)


def test_inside_jit_shapes_are_checked_and_a_traced_start_is_not(model):
    cache = model.init_cache(1, 8)
    traced = jax.eval_shape(lambda ids, c, s: model(ids, cache=c, start=s), PROMPT, cache, jnp.int32(0))
    assert traced[0].shape == (1, 3, VOCAB)
    with pytest.raises(InputError, match=r"cache\[0\]\['k'\] is float32 \(2, 8"):
        jax.eval_shape(lambda ids, c: model(ids, cache=c, start=0), PROMPT, model.init_cache(2, 8))
    with pytest.raises(InputError, match="integer array"):
        jax.eval_shape(lambda ids: model(ids), PROMPT.astype(np.float32))
    with pytest.raises(InputError, match="more than the model's context of 64"):
        jax.eval_shape(lambda ids: model(ids), np.ones((1, 65), np.int32))


def test_every_refusal_is_a_quark_moe_error_and_a_value_error(model):
    with pytest.raises(QuarkMoEError):
        model.generate(PROMPT, -1)
    with pytest.raises(ValueError):
        model(np.array([[VOCAB]]))


# ---------------------------------------------------------------------------------------------------- fuzz
# Each argument is valid in most draws and anything in the rest (so that about a third of the calls run).
# Valid draws: one row of 3 or 4 tokens (prompt bucket 4) and 2 to 4 new tokens (a cache of 8), so that the
# whole fuzz compiles one greedy and one sampling prefill and decode step, and one forward.


def mostly(valid, anything):
    """``valid`` in about 5 draws of 6, else ``anything``."""
    return st.tuples(st.sampled_from([True] * 5 + [False]), valid, anything).map(lambda d: d[1] if d[0] else d[2])


GOOD_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=3, max_size=4).map(lambda row: np.array([row], np.int32))
BAD_IDS = st.one_of(
    st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=4).map(lambda row: [row]),
    st.sampled_from([np.zeros((0, 3), np.int32), np.zeros((1, 0), np.int32), np.ones((1, 65), np.int32)]),
    st.sampled_from([np.ones(3, np.int32), np.ones((1, 3), np.float32), [[1], [1, 2]], "1,2"]),
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-40, max_value=1e-36),
    st.integers(-3, 3),
    st.sampled_from([0, 1.0, True, None, "0.5", np.float32(0.5), jnp.float32(1.0), 10**400]),
)
TEMPERATURES = st.one_of(
    st.just(0.0), st.floats(0.05, 2.0), st.floats(2e-38, 1e-30), st.floats(1e30, 3e38)
)  # greedy; ordinary; tiny (logits / t overflow); huge (uniform)
KEYS = st.sampled_from([jax.random.key(1), jax.random.PRNGKey(2)])
BAD_KEYS = st.sampled_from([None, 0, "key", np.zeros(3, np.uint32), jax.random.split(jax.random.key(0))])
EOS = st.one_of(st.none(), st.just([]), st.integers(0, VOCAB - 1), st.lists(st.integers(0, VOCAB - 1), max_size=2))
BAD_EOS = st.sampled_from([-1, VOCAB, [1, VOCAB], "x", True, 1.0])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=False
)
@given(
    ids=mostly(GOOD_IDS, BAD_IDS),
    max_new_tokens=mostly(st.integers(2, 4), st.sampled_from([0, -1, True, 2.0, "2", 62, 2**70])),
    temperature=mostly(TEMPERATURES, NUMBERS),
    top_p=mostly(st.floats(min_value=1e-300, max_value=1.0), NUMBERS),
    key=mostly(KEYS, BAD_KEYS),
    eos_token_id=mostly(EOS, BAD_EOS),
)
def test_generate_refuses_with_one_error_or_gives_valid_tokens(
    model, ids, max_new_tokens, temperature, top_p, key, eos_token_id
):
    try:
        out = model.generate(
            ids, max_new_tokens, temperature=temperature, top_p=top_p, key=key, eos_token_id=eos_token_id
        )
    except QuarkMoEError as e:
        event(f"refused: {type(e).__name__}")
        return
    event("generated" + (" greedily" if temperature == 0 else " by sampling"))
    prompt = np.asarray(ids)
    assert out.dtype == np.int32 and out.shape[0] == 1
    assert prompt.shape[1] <= out.shape[1] <= prompt.shape[1] + max_new_tokens
    np.testing.assert_array_equal(out[:, : prompt.shape[1]], prompt)
    assert ((out >= 0) & (out < VOCAB)).all()
    if out.shape[1] >= 4:
        assert np.isfinite(np.asarray(model(out[:, :4]))).all()
