"""Small checkpoints made with the project's own synthetic model and exporter, shared per test module."""

import warnings

import pytest

from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint


@pytest.fixture(scope="module")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(model_type, scheme, **kwargs)`` -> (float folder, Quark folder), cached per module."""
    cache = {}

    def make(model_type="mixtral", scheme="w_mxfp4", *, float_kwargs=(), **export_kwargs):
        key = (model_type, scheme, tuple(sorted(dict(float_kwargs).items())), repr(sorted(export_kwargs.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{model_type}_{scheme}")
            src = write_float_checkpoint(root / "float", model_type, **dict(float_kwargs))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = (src, export_quark_checkpoint(src, root / "quark", scheme, **export_kwargs))
        return cache[key]

    return make
