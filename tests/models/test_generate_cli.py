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
