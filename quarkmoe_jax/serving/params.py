"""What a request asks for: :class:`SamplingParams`, checked when it is made."""

from __future__ import annotations

import dataclasses

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.models import inputs

__all__ = ["SamplingParams", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20
"""The most top tokens a request may ask log-probabilities for (OpenAI's chat API and vLLM's default cap)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates (vLLM's ``SamplingParams``, the fields this engine supports).

    ``max_new_tokens``: at most this many new tokens (>= 1). ``temperature``: 0 greedy, else sample from
    ``softmax(logits / temperature)`` (a positive normal float32). ``top_p`` in ``(0, 1]`` and ``top_k`` (0: off)
    restrict the sampled set. ``seed``: the request's own random stream (None: the engine draws one from its
    seed); the same seed gives the same tokens whatever else is in the batch. ``stop_token_ids``: the request
    stops after producing one of these (kept in its output); None: the model's ``eos_token_id``; ``()``:
    never stops early. ``logprobs``: None (default) or ``k`` in ``[0, MAX_LOGPROBS]``: each new token comes with
    its log-probability and those of the ``k`` most likely tokens at that step (the model's distribution before
    temperature, top-k and top-p, as vLLM's default "raw" logprobs).

    A bad value raises :class:`~quarkmoe_jax.errors.InputError` (a ``ValueError``) naming the field.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None

    def __post_init__(self):
        set_field = object.__setattr__
        set_field(self, "max_new_tokens", inputs.positive_int(self.max_new_tokens, "max_new_tokens"))
        temperature, top_p = inputs.check_sampling(self.temperature, self.top_p)
        set_field(self, "temperature", temperature)
        set_field(self, "top_p", top_p)
        if not inputs.is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}", field="top_k")
        set_field(self, "top_k", int(self.top_k))
        if self.seed is not None:
            set_field(self, "seed", inputs.check_seed(self.seed))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise InputError(f"stop_token_ids must be a list of token ids, got {ids!r}", field="stop_token_ids")
            ids = tuple(ids)
            if not all(inputs.is_int(i) and i >= 0 for i in ids):
                raise InputError(
                    f"stop_token_ids must be non-negative token ids, got {list(ids)!r}", field="stop_token_ids"
                )
            set_field(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.logprobs is not None:
            if not inputs.is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InputError(
                    f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                    field="logprobs",
                )
            set_field(self, "logprobs", int(self.logprobs))

    @property
    def greedy(self) -> bool:
        """Takes the argmax and asks for nothing that the greedy step program does not compute."""
        return self.temperature == 0 and self.logprobs is None
