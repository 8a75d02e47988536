"""Offline batch generation through the engine (what ``vllm.LLM.generate`` gives)."""

from __future__ import annotations

from collections.abc import Sequence

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.serving.engine import Engine
from quarkmoe_jax.serving.params import SamplingParams

__all__ = ["generate"]


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    engine: Engine | None = None,
) -> list[list[int]]:
    """Each prompt's new token ids, in the prompts' order.

    Args:
      model: a :class:`~quarkmoe_jax.models.QuarkMoEForCausalLM` (ignored when ``engine`` is given).
      prompts: a list of token-id lists.
      params: one :class:`SamplingParams` for every prompt, or one per prompt (default: ``SamplingParams()``).
      engine: an :class:`Engine` to run them on (default: a new one with its defaults).

    Every prompt is checked before any runs (:class:`~quarkmoe_jax.errors.InputError` naming the prompt).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InputError("prompts must be a list of token-id lists")
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    elif len(params) != len(prompts):
        raise InputError(
            f"params must be one SamplingParams or one per prompt: {len(params)} for {len(prompts)} prompts"
        )
    engine = Engine(model) if engine is None else engine
    ids = []
    try:
        for index, (prompt, request_params) in enumerate(zip(prompts, params, strict=True)):
            try:
                ids.append(engine.add_request(prompt, request_params))
            except InputError as e:
                raise InputError(f"prompts[{index}]: {e}", field=e.field) from None
    except InputError:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    produced = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id in produced:
                produced[output.request_id].extend(output.new_token_ids)
    return [produced[request_id] for request_id in ids]
