"""quarkmoe_jax.tokenizer: tokenizer.json and tokenizer_config.json read under the shards' path and size rules,
each bad file one error naming it; tokenizer_config.json's add_bos_token / add_eos_token applied as transformers
applies them (the BOS once, even where tokenizer.json's own post-processor adds it too)."""

import json
import os
import pathlib

import pytest
import tokenizers

from quarkmoe_jax import cli
from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.files import MAX_JSON_BYTES
from quarkmoe_jax.tokenizer import TokenizerConfig, load_tokenizer, read_tokenizer_config

VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 10)}}


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    """A folder with a word-level tokenizer.json whose post-processor adds ``<s>`` (as Llama's and Mixtral's
    tokenizer.json do)."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    path = tmp_path / "ckpt"
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def write_config(folder: pathlib.Path, **settings) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def test_the_fields_generation_and_chat_need_are_read(folder):
    assert read_tokenizer_config(folder) is None  # none there
    write_config(
        folder,
        add_bos_token=True,
        add_eos_token=None,
        bos_token="<s>",
        eos_token={"__type": "AddedToken", "content": "</s>", "lstrip": False, "special": True},
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        model_max_length=32768,
        added_tokens_decoder={"1": {"content": "<s>", "special": True}},
    )
    config = read_tokenizer_config(folder)
    assert config == TokenizerConfig(
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,  # present but null: False, as transformers reads it
    )
    write_config(folder, chat_template=[{"name": "default", "template": "a"}, {"name": "tool_use", "template": "b"}])
    assert read_tokenizer_config(folder) == TokenizerConfig(chat_template={"default": "a", "tool_use": "b"})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bos_token": 3}, r"bos_token: expected a string, an AddedToken object .* or null, found 3"),
        ({"eos_token": {"special": True}}, r"eos_token: expected a string, an AddedToken object"),
        ({"add_bos_token": "yes"}, r"add_bos_token: expected true, false or null, found 'yes'"),
        ({"add_eos_token": 1}, r"add_eos_token: expected true, false or null, found 1"),
        ({"chat_template": 5}, r"chat_template: expected a string, a list of .* or null, found 5"),
        ({"chat_template": [{"name": "default"}]}, r"chat_template: expected a string, a list of"),
    ],
)
def test_wrong_types_are_one_error_naming_the_key(folder, settings, message):
    write_config(folder, **settings)
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: " + message):
        read_tokenizer_config(folder)


def test_bad_files_are_refused_naming_them(folder, tmp_path):
    path = folder / "tokenizer_config.json"
    for content, message in [
        (b"{not json", "expected valid JSON"),
        (b"[1, 2]", "expected a JSON object of settings, found list"),
        (b"\xff\xfe\x00binary", "expected valid JSON"),
    ]:
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            read_tokenizer_config(folder)
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse
    with pytest.raises(CheckpointError, match=f"expected a tokenizer_config.json of at most {MAX_JSON_BYTES}"):
        read_tokenizer_config(folder)
    path.unlink()
    (tmp_path / "elsewhere.json").write_text("{}")
    path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json resolves to .* outside the checkpoint folder"):
        read_tokenizer_config(folder)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match="expected a regular tokenizer_config.json, found a FIFO"):
        read_tokenizer_config(folder)


def test_bos_and_eos_follow_tokenizer_config_and_the_bos_comes_once(folder):
    """tokenizer.json's post-processor adds ``<s>``; transformers replaces it whenever tokenizer_config.json
    sets add_bos_token or add_eos_token, so the BOS is never added twice."""

    def ids(**settings):
        (folder / "tokenizer_config.json").unlink(missing_ok=True)
        if settings:
            write_config(folder, **settings)
        return load_tokenizer(folder, needed=True).encode("w3 w4").ids

    assert ids() == [1, 3, 4]  # tokenizer.json's own post-processor
    assert ids(chat_template="x") == [1, 3, 4]  # no add_*_token: unchanged
    assert ids(add_bos_token=True, bos_token="<s>") == [1, 3, 4]  # once, not [1, 1, 3, 4]
    assert ids(add_bos_token=False, bos_token="<s>") == [3, 4]
    assert ids(add_bos_token=None, bos_token="<s>") == [3, 4]
    assert ids(add_bos_token=True, add_eos_token=True, bos_token="<s>", eos_token={"content": "</s>"}) == [1, 3, 4, 2]
    assert ids(add_bos_token=True) == [3, 4]  # no bos_token named: nothing to add (transformers likewise)
    write_config(folder, add_bos_token=True, bos_token="<bos>")
    with pytest.raises(CheckpointError, match=r"bos_token '<bos>' \(added by add_bos_token\): expected a token of"):
        load_tokenizer(folder, needed=True)


def test_generate_prints_one_error_line_for_a_bad_tokenizer_config(folder, capsys):
    write_config(folder, add_bos_token="true")
    assert cli.main(["generate", str(folder), "--prompt", "w3", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "tokenizer_config.json: add_bos_token: expected true, false or null, found 'true'" in err
