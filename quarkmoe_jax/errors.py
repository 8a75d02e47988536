"""The one base class of every error this library raises about what a user gave it.

A checkpoint file, ``config.json``, Quark ``quantization_config``, scheme or array that is missing,
malformed or unsupported raises a subclass of :class:`QuarkMoEError` whose message names the file or key,
what was expected and what was found (one line; ``quarkmoe`` prints it as its error). It derives from
``ValueError``, so code that caught ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["QuarkMoEError", "CheckpointError", "SchemeError"]


class QuarkMoEError(ValueError):
    """Bad user input: a checkpoint, config, scheme or array this library refuses (the message says why)."""


class CheckpointError(QuarkMoEError):
    """A checkpoint file, tensor or key is missing or malformed."""


class SchemeError(QuarkMoEError):
    """A quantization config that no scheme accepts, or that is incoherent; names the scheme and the key."""
