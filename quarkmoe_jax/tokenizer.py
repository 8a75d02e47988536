"""A checkpoint's tokenizer files, read under the shards' path rules (inside the folder or the Hugging Face
cache's blobs, no symlink leading out; regular files; size-capped), each bad file one error naming it.

* :func:`load_tokenizer`: ``tokenizer.json`` through the ``tokenizers`` library (the ``text`` extra), with the
  BOS / EOS handling that ``tokenizer_config.json`` asks for applied as transformers applies it.
* :func:`read_tokenizer_config`: the fields of ``tokenizer_config.json`` that generation and chat need
  (:class:`TokenizerConfig`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quarkmoe_jax.errors import CheckpointError

__all__ = ["MAX_TOKENIZER_BYTES", "TokenizerConfig", "load_tokenizer", "read_tokenizer_config"]

MAX_TOKENIZER_BYTES = 64 << 20
"""The largest ``tokenizer.json`` read (real ones take up to a few tens of megabytes). ``tokenizer_config.json``
is held to the cap of every other JSON file, :data:`quarkmoe_jax.files.MAX_JSON_BYTES` (16 MiB)."""


@dataclass(frozen=True)
class TokenizerConfig:
    """What a checkpoint's ``tokenizer_config.json`` says about special tokens and chat.

    ``chat_template``: the Jinja template, or ``{name: template}`` when the file lists several (as
    transformers holds it); None when absent. ``bos_token`` / ``eos_token``: the tokens' text (an
    ``AddedToken`` object's ``content``); None when absent. ``add_bos_token`` / ``add_eos_token``: None when the
    key is absent, else whether encoding adds the token (a null value counts as False, as in transformers).
    """

    chat_template: str | dict[str, str] | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None


def read_tokenizer_config(checkpoint: str | os.PathLike) -> TokenizerConfig | None:
    """The checkpoint folder's ``tokenizer_config.json`` (None when it has none): a regular file inside the
    folder of at most 16 MiB holding a JSON object, whose ``chat_template``, ``bos_token``, ``eos_token``,
    ``add_bos_token`` and ``add_eos_token`` have the types transformers writes; anything else is one
    :class:`CheckpointError` naming the file and the key. Other keys are not read."""
    from quarkmoe_jax.checkpoint.safetensors_io import folder_file
    from quarkmoe_jax.files import read_json_file

    path = folder_file(checkpoint, "tokenizer_config.json")
    if path is None:
        return None
    content = read_json_file(path, "tokenizer_config.json")
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, found {type(content).__name__}")

    def fail(key: str, expected: str) -> CheckpointError:
        found = repr(content[key])
        return CheckpointError(f"{path}: {key}: expected {expected}, found {found[:80]}")

    def token(key: str) -> str | None:
        value = content.get(key)
        if isinstance(value, Mapping):  # a serialized AddedToken: {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
            if not isinstance(value, str):
                raise fail(key, "a string, an AddedToken object with a string 'content', or null")
        if value is not None and not isinstance(value, str):
            raise fail(key, "a string, an AddedToken object with a string 'content', or null")
        return value

    def flag(key: str) -> bool | None:
        if key not in content:
            return None
        if content[key] is not None and not isinstance(content[key], bool):
            raise fail(key, "true, false or null")
        return bool(content[key])

    return TokenizerConfig(
        chat_template=_chat_template(content, fail),
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        add_bos_token=flag("add_bos_token"),
        add_eos_token=flag("add_eos_token"),
    )


def _chat_template(content: dict[str, Any], fail) -> str | dict[str, str] | None:
    """``chat_template``: a string, or transformers' list of ``{"name": ..., "template": ...}``."""
    value = content.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    expected = "a string, a list of {'name': str, 'template': str} objects, or null"
    if not isinstance(value, list):
        raise fail("chat_template", expected)
    templates = {}
    for entry in value:
        if not (
            isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)
        ):
            raise fail("chat_template", expected)
        templates[entry["name"]] = entry["template"]
    return templates


def load_tokenizer(checkpoint: str | os.PathLike, needed: bool):
    """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer``; None when it has none (an error when
    ``needed``: a text prompt) or when the library is missing and not needed.

    Read under the shards' rules (inside the folder, a regular file, at most :data:`MAX_TOKENIZER_BYTES`); a
    file the library cannot read is one :class:`CheckpointError`. When ``tokenizer_config.json`` sets
    ``add_bos_token`` or ``add_eos_token``, the tokenizer's post-processor is replaced, as transformers'
    fast tokenizers do (``TokenizersBackend.update_post_processor``), by one that adds exactly the requested
    tokens: ``tokenizer.encode(text).ids`` then equals transformers' ``tokenizer(text).input_ids``, with the
    BOS once even where tokenizer.json's own post-processor already adds it. Without those keys, tokenizer.json's
    post-processor stays as it is (transformers' model-specific classes can default differently: transformers
    4.x's ``LlamaTokenizerFast`` adds a BOS when ``add_bos_token`` is absent).
    """
    from quarkmoe_jax.checkpoint.safetensors_io import folder_file
    from quarkmoe_jax.files import open_regular_file

    path = folder_file(checkpoint, "tokenizer.json")
    if path is None:
        if needed:
            raise ValueError(
                f"--prompt needs {checkpoint}/tokenizer.json (a tokenizer); this checkpoint has none: pass --prompt-ids"
            )
        return None
    try:
        import tokenizers
    except ImportError:
        if needed:
            raise ValueError("--prompt needs the tokenizers library: pip install 'quarkmoe-jax[text]'") from None
        return None
    with open_regular_file(path, "tokenizer.json") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, expected a tokenizer.json of at most {MAX_TOKENIZER_BYTES}")
        raw = f.read()
    try:
        tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the library raises its own exception types for a bad file
        message = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library reads ({message})") from None
    config = read_tokenizer_config(checkpoint)
    if config is not None and (config.add_bos_token is not None or config.add_eos_token is not None):
        tokenizer.post_processor = _special_tokens_processor(tokenizer, config, checkpoint)
    return tokenizer


def _special_tokens_processor(tokenizer, config: TokenizerConfig, checkpoint):
    """transformers' template: ``[BOS] $A [EOS]`` with each token where ``add_*_token`` asks for it and the
    config names it (``TokenizersBackend.update_post_processor``)."""
    from tokenizers.processors import TemplateProcessing

    special = []
    for key, text, wanted in (
        ("bos_token", config.bos_token, config.add_bos_token),
        ("eos_token", config.eos_token, config.add_eos_token),
    ):
        if wanted and text is not None:
            token_id = tokenizer.token_to_id(text)
            if token_id is None:
                raise CheckpointError(
                    f"{checkpoint}/tokenizer_config.json: {key} {text!r} (added by add_{key}): expected a token of "
                    "tokenizer.json's vocabulary, found none"
                )
            special.append((key, text, token_id))
    bos = [text for key, text, _ in special if key == "bos_token"]
    eos = [text for key, text, _ in special if key == "eos_token"]
    single = " ".join([*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)])
    pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
    ids = {text: token_id for _, text, token_id in special}  # once each, even where BOS and EOS are one token
    return TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
