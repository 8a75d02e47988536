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
    assert "backend emulation (auto)" in first[2]  # what "auto" ran, not "auto"


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


def test_run_layer_prints_the_backend_that_ran(checkpoint, tmp_path, capsys, monkeypatch):
    from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS
    from quarkmoe_jax.moe import op
    from quarkmoe_jax.nn import QuarkMoEBlock

    np.save(tmp_path / "x.npy", np.ones((3, 64), np.float32))
    argv = ["run-layer", str(checkpoint), "--layer", "0", "--input", str(tmp_path / "x.npy"), "--output"]
    assert cli.main([*argv, str(tmp_path / "y.npy")]) == 0
    assert capsys.readouterr().out.strip().endswith("backend emulation (auto)")  # auto on CPU
    # "auto" takes the first backend of its order whose trace accepts the call (on a GPU, a kernel backend)
    block = QuarkMoEBlock.from_checkpoint(checkpoint, 0)
    monkeypatch.setattr(op, "auto_order", lambda quant_config, rows: ("triton", "pallas", "emulation"))
    first = "triton" if KERNEL_BACKENDS["triton"].unavailable() is None else "pallas"
    assert cli.backend_run("auto", block, (3,), np.float32) == f"{first} (auto)"
    assert cli.backend_run("pallas", block, (3,), np.float32) == "pallas"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,2,3", "--max-new-tokens", 10**9], "more than the model's context of 4096 positions"),
        (["--prompt-ids", ",".join(["1"] * 5000), "--max-new-tokens", 1], "5000 tokens, more than the model's context"),
        (["--prompt-ids", "1,2,3", "--max-new-tokens", -1], "max_new_tokens must be a positive integer"),
        (["--prompt-ids", f"1,{2**70}", "--max-new-tokens", 1], f"--prompt-ids: {2**70} is not a token"),
        (["--prompt-ids", "1,-1", "--max-new-tokens", 1], "--prompt-ids: -1 is not a token id"),
        (
            ["--prompt-ids", "1", "--max-new-tokens", 1, "--temperature", 0.5, "--seed", 2**70],
            "seed must be an integer",
        ),
        (["--prompt-ids", "1", "--max-new-tokens", 1, "--temperature", "nan"], "temperature must be finite"),
        (["--prompt-ids", "1", "--max-new-tokens", 1, "--temperature=-inf"], "temperature must be finite"),
        (["--prompt-ids", "1", "--max-new-tokens", 1, "--temperature", -1], r"temperature must be 0 \(greedy\)"),
        (["--prompt-ids", "1", "--max-new-tokens", 1, "--top-p", 1.5], r"top_p must be in \(0, 1\]"),
        (["--prompt-ids", "1", "--max-new-tokens", 1, "--max-model-len", 0], "max_model_len must be a positive"),
        (["--prompt-ids", "1,2,3", "--max-new-tokens", 2, "--max-model-len", 4], r"4 positions \(max_model_len\)"),
    ],
)
def test_generation_limits_are_one_error_line_before_the_model_loads(checkpoint, capsys, monkeypatch, args, message):
    import quarkmoe_jax.models

    def fail(*args, **kwargs):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(quarkmoe_jax.models, "from_pretrained", fail)
    code, _, err = run(capsys, checkpoint, *args)
    assert code == 2 and err.startswith("quarkmoe generate: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_refusals_take_little_memory_and_time_and_leave_nothing_behind(checkpoint, tmp_path):
    """The issue's cases in a fresh process (the real command line): 1e9 new tokens, a 5000-token prompt, a
    seed of 2**70. Each is one error line; the process peaks under 1 GB and the three take under 30 s."""
    import os
    import pathlib
    import subprocess
    import sys
    import time

    root = pathlib.Path(__file__).resolve().parents[2]
    script = (
        "import sys\n"
        "from quarkmoe_jax import cli\n"
        "for extra in sys.argv[2:]:\n"
        "    assert cli.main(['generate', sys.argv[1], *extra.split()]) == 2\n"
        # VmHWM: this process image's peak (ru_maxrss would keep the forking pytest worker's peak across exec)
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    cases = [
        "--prompt-ids 1,2,3 --max-new-tokens 1000000000",
        f"--prompt-ids {','.join(['7'] * 5000)} --max-new-tokens 16",
        f"--prompt-ids 1 --max-new-tokens 4 --temperature 0.8 --seed {2**70}",
    ]
    before = sorted(p.name for p in checkpoint.iterdir())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint), *cases], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("quarkmoe generate: error:") for line in lines), result.stderr
    assert "4096 positions" in lines[0] and "5000 tokens" in lines[1] and "seed" in lines[2]
    assert int(result.stdout) < 1 << 20, f"peak RSS {result.stdout} KB"  # VmHWM: kilobytes
    assert elapsed < 30
    assert sorted(p.name for p in checkpoint.iterdir()) == before and not any(tmp_path.iterdir())


def test_several_prompts_run_through_the_engine_together(checkpoint, capsys):
    """--prompt-ids (and --prompt) repeat; each prompt's new tokens are what generate gives it alone."""
    code, out, err = run(capsys, checkpoint, "--prompt-ids", "1,2,3", "--prompt-ids", "9", "--max-new-tokens", 3)
    assert code == 0, err
    lines = [line for line in out.splitlines() if " ids:" in line]  # (each prompt's decoded text is printed too)
    assert lines[0] == "[0] prompt ids: [1, 2, 3]" and lines[2] == "[1] prompt ids: [9]"
    model = from_pretrained(checkpoint)
    for line, prompt in ((lines[1], [1, 2, 3]), (lines[3], [9])):
        new = json.loads(line.split("new ids:")[1])
        assert new == model.generate(np.array([prompt]), 3, eos_token_id=[])[0, len(prompt) :].tolist()[: len(new)]
    assert "KV cache:" in err and "2 prompt(s)" in err


def test_the_quarkmoe_command_keeps_its_compiled_programs_between_runs(checkpoint, tmp_path):
    """The installed ``quarkmoe`` executable, twice: the first run fills the compilation cache folder
    ($QUARKMOE_COMPILATION_CACHE), the second reads it and prints the same tokens; ``off`` keeps none."""
    import os
    import pathlib
    import subprocess
    import sys

    executable = pathlib.Path(sys.executable).parent / "quarkmoe"
    argv = [str(executable), "generate", str(checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]

    def run_with(cache: str) -> list[str]:
        env = {**os.environ, "QUARKMOE_COMPILATION_CACHE": cache, "JAX_PLATFORMS": "cpu"}
        result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return [line for line in result.stdout.splitlines() if "new ids:" in line]

    cache = tmp_path / "cache"
    first = run_with(str(cache))

    def programs():  # each cached program's file and when it was written
        return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name.endswith("-cache")}

    written = programs()
    assert written, "the first run cached no program"
    assert run_with(str(cache)) == first and programs() == written  # read, neither compiled nor written again
    assert run_with("off") == first and not (tmp_path / "off").exists()


def test_the_compilation_cache_folder_follows_the_environment(tmp_path):
    assert cli.compilation_cache_dir({cli.COMPILATION_CACHE_ENV: "OFF"}) is None
    assert cli.compilation_cache_dir({cli.COMPILATION_CACHE_ENV: str(tmp_path)}) == tmp_path
    assert cli.compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "quarkmoe" / "jax"
    home = cli.compilation_cache_dir({})
    assert home.parts[-3:] == (".cache", "quarkmoe", "jax")


def test_without_filelock_there_is_no_compilation_cache_and_no_warning_per_compile(tmp_path, monkeypatch):
    """JAX caps the cache's size only with ``filelock`` (else it warns at every compile and caches nothing)."""
    import importlib.util

    import jax

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "filelock" else real(name, *a))
    assert cli.use_compilation_cache({cli.COMPILATION_CACHE_ENV: str(tmp_path / "cache")}) is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "cache").exists()
