"""``quarkmoe generate``: a whole model from a checkpoint folder, prompted with text (the checkpoint's
tokenizer.json through the ``tokenizers`` library) or with token ids."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tokenizers

from quarkmoe_jax import cli
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
from quarkmoe_jax.models import from_pretrained

VOCAB = 128  # the synthetic models' vocabulary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A synthetic Qwen3-MoE model with a word-level tokenizer.json (word ``w<i>`` is token i), exported to
    MXFP4 (the exporter copies the tokenizer)."""
    root = tmp_path_factory.mktemp("generate")
    float_dir = write_float_checkpoint(root / "float", "qwen3_moe", num_layers=1)
    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(float_dir / "tokenizer.json"))
    return export_quark_checkpoint(float_dir, root / "q", "w_mxfp4_a_mxfp4")


def run(capsys, *args):
    code = cli.main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_prompt_through_the_checkpoints_tokenizer(checkpoint, capsys):
    code, out, err = run(capsys, checkpoint, "--prompt", "w5 w17 w3", "--max-new-tokens", 4)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("w5 w17 w3 ")  # the decoded prompt and continuation
    assert lines[1] == "prompt ids: [5, 17, 3]"
    new = json.loads(lines[2].removeprefix("new ids:").strip())
    expected = from_pretrained(checkpoint).generate(np.array([[5, 17, 3]]), 4)[0, 3:].tolist()
    assert new == expected and len(new) == 4
    assert lines[0].split()[3:] == [f"w{i}" for i in new]


def test_prompt_ids_and_reproducible_sampling(checkpoint, capsys):
    args = (checkpoint, "--prompt-ids", "1, 2,3", "--max-new-tokens", 5, "--temperature", 0.9, "--seed", 7)
    first, again = run(capsys, *args), run(capsys, *args)
    assert first[0] == 0 and first[1] == again[1]
    assert "prompt ids: [1, 2, 3]" in first[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,x"], "comma-separated token ids"),
        (["--prompt-ids", "1,999"], r"input_ids must be in \[0, 128\)"),
        (["--prompt-ids", "1", "--temperature", "0.5", "--top-p", "0"], "top_p"),
    ],
)
def test_bad_prompts_give_one_error_line(checkpoint, capsys, args, message):
    code, _, err = run(capsys, checkpoint, *args, "--max-new-tokens", 2)
    assert code == 2 and err.startswith("quarkmoe generate: error:")
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


def test_a_text_prompt_needs_a_tokenizer(tmp_path, capsys):
    folder = write_float_checkpoint(tmp_path / "f", "mixtral", num_layers=1)
    code, _, err = run(capsys, folder, "--prompt", "hello", "--max-new-tokens", 2)
    assert code == 2 and "tokenizer.json" in err and "--prompt-ids" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not a tokenizer.json the tokenizers library reads"),
        (b'{"version": "1.0", "model": 3}', "not a tokenizer.json the tokenizers library reads"),
        (b"\xff\xfe\x00binary", "not a tokenizer.json the tokenizers library reads"),
        (b"", "not a tokenizer.json the tokenizers library reads"),
    ],
)
def test_an_unreadable_tokenizer_is_one_error_line(tmp_path, capsys, content, message):
    """Bad JSON, the wrong schema, binary or empty: one line naming the file, exit 2, no traceback."""
    folder = write_float_checkpoint(tmp_path / "f", "mixtral", num_layers=1)
    (folder / "tokenizer.json").write_bytes(content)
    code, _, err = run(capsys, folder, "--prompt", "hello", "--max-new-tokens", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_config_and_tokenizer_that_lead_out_of_the_folder_are_refused(tmp_path, capsys, checkpoint):
    """config.json and tokenizer.json are held to the shards' path rules: a symlink out of the checkpoint
    folder is refused (they used to be followed); a FIFO is refused without blocking; a tokenizer over the
    size cap is refused before it is read."""
    import os
    import shutil

    from quarkmoe_jax.checkpoint.loader import read_hf_config
    from quarkmoe_jax.errors import CheckpointError

    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    shutil.move(folder / "config.json", outside / "config.json")
    (folder / "config.json").symlink_to(outside / "config.json")
    with pytest.raises(CheckpointError, match="config.json resolves to .*outside the checkpoint folder"):
        read_hf_config(folder)
    (folder / "config.json").unlink()
    shutil.copy(outside / "config.json", folder / "config.json")
    assert read_hf_config(folder)["model_type"] == "qwen3_moe"

    shutil.move(folder / "tokenizer.json", outside / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    code, _, err = run(capsys, folder, "--prompt", "w1 w2", "--max-new-tokens", 1)
    assert code == 2 and "outside the checkpoint folder" in err
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    code, _, err = run(capsys, folder, "--prompt", "w1 w2", "--max-new-tokens", 1)
    assert code == 2 and "expected a regular tokenizer.json" in err
    (folder / "tokenizer.json").unlink()
    with open(folder / "tokenizer.json", "wb") as f:
        f.truncate(cli.MAX_TOKENIZER_BYTES + 1)  # sparse: no 64 MiB written
    code, _, err = run(capsys, folder, "--prompt", "w1 w2", "--max-new-tokens", 1)
    assert code == 2 and f"expected a tokenizer.json of at most {cli.MAX_TOKENIZER_BYTES}" in err
