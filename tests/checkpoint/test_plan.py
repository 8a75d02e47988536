"""``quarkmoe plan``: bytes per device of each expert x tensor parallel layout, from the headers alone.

A DeepSeek-V3-sized MXFP4 checkpoint written as sparse files (real headers, no data: ~350 GiB that take a few
MB of disk), and a small exported one whose per-device bytes are worked out by hand below.
"""

import dataclasses
import json
import math
import shutil
import struct
import warnings

import ml_dtypes
import numpy as np
import pytest

from quarkmoe_jax import cli
from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.loader import check_checkpoint_headers
from quarkmoe_jax.checkpoint.plan import CATEGORIES, plan_checkpoint
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile, save_file
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint, write_sparse_checkpoint
from quarkmoe_jax.models import DecoderConfig
from quarkmoe_jax.models.inputs import cache_bytes

#: DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3), without its FP8 quantization_config.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}
GIB = 2**30


def header_bytes(path) -> int:
    with CheckpointReader(path) as reader:
        return sum(math.prod(reader.info(n)[1]) * reader.info(n)[0].itemsize for n in reader)


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "deepseek_v3_mxfp4"
    return write_sparse_checkpoint(path, DEEPSEEK_V3, "w_mxfp4")


def test_a_deepseek_v3_sized_checkpoint_is_planned_from_its_headers(deepseek_v3, monkeypatch):
    files = sorted(deepseek_v3.iterdir())
    apparent = sum(f.stat().st_size for f in files)
    on_disk = sum(f.stat().st_blocks * 512 for f in files)
    assert apparent > 300 * GIB and on_disk < 64 * 2**20  # ~350 GiB of sparse shards: only headers written
    assert (deepseek_v3 / "model.safetensors.index.json").is_file() and len(files) > 50

    def no_data(*args, **kwargs):
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(SafetensorsFile, "get", no_data)
    monkeypatch.setattr(SafetensorsFile, "view", no_data)
    plan = plan_checkpoint(deepseek_v3, 8, 141 * 10**9)
    monkeypatch.undo()

    data_bytes = 0  # each file's size less its 8-byte length and its header
    for f in deepseek_v3.glob("*.safetensors"):
        with open(f, "rb") as stream:
            data_bytes += f.stat().st_size - 8 - struct.unpack("<Q", stream.read(8))[0]
    assert plan.total_bytes == sum(plan.category_bytes.values()) == data_bytes
    assert (plan.num_layers, plan.moe_layers, plan.num_experts) == (61, 58, 256)
    assert [(lay.expert, lay.tensor) for lay in plan.layouts] == [(8, 1), (4, 2), (2, 4), (1, 8)]
    routed = plan.category_bytes["routed_experts"]
    # 58 layers x 256 experts x 3 projections of 2048 x 7168 MXFP4 values (half a byte each, an E8M0 per 32)
    assert routed == 58 * 256 * 3 * 2048 * 7168 * (1 / 2 + 1 / 32)
    ep8, tp8 = plan.layout(8, 1), plan.layout(1, 8)
    assert ep8.category_bytes["routed_experts"] == math.ceil(256 / 8) * routed // 256 == routed // 8
    assert ep8.category_bytes["attention"] == plan.category_bytes["attention"]  # replicated over the expert axis
    assert tp8.category_bytes["routed_experts"] == routed // 8  # I = 2048: 8 slices of 256, no padding
    assert tp8.category_bytes["embeddings"] == plan.category_bytes["embeddings"] // 8  # 129280 = 64 x 2020
    assert tp8.category_bytes["attention"] < plan.category_bytes["attention"] / 4  # latent down-projections whole
    assert plan.category_bytes["unused"] == 0
    # the latent KV cache: kv_lora_rank + qk_rope_head_dim bf16 values per layer, replicated over TP
    config = DecoderConfig.from_hf_config(DEEPSEEK_V3)
    assert {lay.kv_bytes_per_token for lay in plan.layouts} == {61 * 576 * 2} == {cache_bytes(config, 1, 1, "bfloat16")}
    assert plan.context == 163840 and plan.usable_bytes == int(141 * 10**9 * 0.9)
    for layout in plan.layouts:  # 8 x H200 (141 GB): every layout holds the weights and a whole context
        assert layout.fits and layout.problem is None
        assert layout.room_bytes == plan.usable_bytes - layout.weight_bytes
        assert layout.room_tokens == layout.room_bytes // layout.kv_bytes_per_token > plan.context
    assert 40 * GIB < tp8.weight_bytes < ep8.weight_bytes < 80 * GIB
    small_devices = plan.for_memory(24 * GIB)  # 8 x 24 GiB: no layout holds even the weights
    assert small_devices.usable_bytes == int(24 * GIB * 0.9)
    assert not any(layout.fits for layout in small_devices.layouts)
    assert all(layout.room_bytes < 0 and layout.room_tokens == 0 for layout in small_devices.layouts)
    assert plan.for_memory(None).layouts[0].fits is None


# ----------------------------------------------------------------------------------- a small one, by hand


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Mixtral-style, 2 MoE layers, hidden 64, 3 experts of I = 80 (not a multiple of 32), 4 heads of 16
    channels, 2 KV heads, vocabulary 128; experts in MXFP4."""
    root = tmp_path_factory.mktemp("plan_small")
    src = write_float_checkpoint(root / "float", num_layers=2, hidden_size=64, intermediate_size=80, num_experts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_quark_checkpoint(src, root / "mxfp4", "w_mxfp4")


# Bytes of the small checkpoint, worked out by hand (bf16 = 2 bytes; MXFP4: half a byte per value, one E8M0 byte
# per 32 values along the contraction):
EXPERT = 2 * (80 * 32 + 80 * 2) + 64 * 40 + 64 * 3  # w1, w3 [80, 64]: 2560 + 160 each; w2 [64, 80]: 2560 + 192
ATTENTION = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)  # q, k, v, o per layer
VOCAB = 2 * 128 * 64  # embeddings, and the LM head
REPLICATED = 2 * 64 + 2 * (2 * 2 * 64 + 2 * 3 * 64)  # final norm; per layer two norms and the router [3, 64]
# On a tensor shard of TP 2, an expert's I = 80 is a slice of round_up(ceil(80 / 2), 32) = 64 channels (the
# second shard's last 48 are zero padding): w1, w3 [64, 64] = 2048 + 128 each, w2 [64, 64] = 2048 + 2 x 64.
EXPERT_TP2 = 2 * (64 * 32 + 64 * 2) + 64 * 32 + 64 * 2
ATTENTION_TP2 = ATTENTION // 2  # 2 of 4 heads, 1 of 2 KV heads, half of o_proj's input columns
KV_PER_TOKEN = 2 * 2 * 1 * 16 * 2  # layers x (key, value) x KV heads x head_dim x bf16, with one KV head


def test_small_checkpoint_bytes_per_device_by_hand(small):
    assert EXPERT == 8192 and EXPERT_TP2 == 6528
    two = plan_checkpoint(small, 2)
    assert two.total_bytes == 2 * 3 * EXPERT + 2 * ATTENTION + 2 * VOCAB + REPLICATED == header_bytes(small)
    tp2 = two.layout(1, 2).category_bytes
    assert tp2 == {
        **dict.fromkeys(CATEGORIES, 0),
        "routed_experts": 2 * 3 * EXPERT_TP2,  # every expert, padded: more than half of 2 x 3 x 8192
        "attention": 2 * ATTENTION_TP2,
        "embeddings": VOCAB // 2,
        "lm_head": VOCAB // 2,
        "replicated": REPLICATED,
    }
    assert two.layout(1, 2).weight_bytes == 81536
    ep2 = two.layout(2, 1).category_bytes  # the busiest expert shard holds ceil(3 / 2) = 2 experts, whole
    assert ep2["routed_experts"] == 2 * 2 * EXPERT and ep2["attention"] == 2 * ATTENTION
    four = plan_checkpoint(small, 4, 200_000, memory_fraction=0.5)
    ep2tp2 = four.layout(2, 2)
    assert ep2tp2.category_bytes["routed_experts"] == 2 * 2 * EXPERT_TP2
    assert ep2tp2.weight_bytes == 2 * 2 * EXPERT_TP2 + 2 * ATTENTION_TP2 + 2 * (VOCAB // 2) + REPLICATED == 68480
    assert [lay.kv_bytes_per_token for lay in four.layouts] == [2 * KV_PER_TOKEN, KV_PER_TOKEN, KV_PER_TOKEN]
    assert ep2tp2.room_bytes == 100_000 - 68480 and ep2tp2.room_tokens == (100_000 - 68480) // KV_PER_TOKEN
    assert not ep2tp2.fits and four.context == 4096  # 246 tokens: less than the config's 4096 positions
    assert plan_checkpoint(small, 4, 200_000, memory_fraction=0.5, max_model_len=200).layout(2, 2).fits
    ep4 = four.layout(4, 1)  # EP 4 of 3 experts: one each (one shard idle), the whole model's rest replicated
    assert ep4.category_bytes["routed_experts"] == 2 * EXPERT
    assert ep4.weight_bytes == 2 * EXPERT + 2 * ATTENTION + 2 * VOCAB + REPLICATED == 99712
    assert (ep4.room_bytes, ep4.room_tokens, ep4.fits) == (288, 1, False)  # 288 bytes: one token of 256
    assert four.layout(1, 4).problem is None  # 4 heads, one each; 2 KV heads, each on two devices
    config = DecoderConfig.from_hf_config(json.loads((small / "config.json").read_text()))
    assert four.layout(4, 1).kv_bytes_per_token == cache_bytes(config, 1, 1, "bfloat16")
    three = plan_checkpoint(small, 3)
    assert three.layout(1, 3).problem == "4 attention heads do not split over TP 3"


def test_layers_past_the_config_are_unused_and_bad_checkpoints_are_named(small, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(small, folder)
    mtp = {"model.layers.2.self_attn.q_proj.weight": np.zeros((64, 64), ml_dtypes.bfloat16)}
    save_file(mtp, folder / "mtp.safetensors")  # a multi-token-prediction layer past num_hidden_layers
    plan = plan_checkpoint(folder, 2)
    assert plan.category_bytes["unused"] == 8192 and plan.total_bytes == header_bytes(small) + 8192
    assert plan.layout(1, 2).weight_bytes == 81536  # on no device
    config = json.loads((small / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"MoE layer 2 has no routed expert tensors \(expected model"):
        plan_checkpoint(folder, 2)
    (folder / "mtp.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 3, but the checkpoint holds no tensors of layer"):
        plan_checkpoint(folder, 2)
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 4}))
    with pytest.raises(CheckpointError, match="tensors of 3 of the config's 4 experts; none of expert"):
        plan_checkpoint(folder, 2)
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 2, "num_experts_per_tok": 1}))
    with pytest.raises(CheckpointError, match=r"experts\.2\..*expert index 2 out of range"):
        plan_checkpoint(folder, 2)
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        plan_checkpoint(folder, 2)
    for bad, message in [
        ({"devices": 0}, "devices must be a positive integer, got 0"),
        ({"devices": True}, "devices must be"),
        ({"devices": 2, "device_memory_bytes": -1}, "device_memory_bytes must be"),
        ({"devices": 2, "memory_fraction": 1.5}, r"memory_fraction must be a number in \(0, 1\]"),
        ({"devices": 2, "max_model_len": 0}, "max_model_len must be"),
        ({"devices": 2, "kv_dtype": "int8"}, "kv_dtype must name a float dtype"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_checkpoint(small, **bad)


def test_the_sparse_writer_lists_what_the_exporter_writes(small, tmp_path):
    """The sparse checkpoint of the small model's config has the exported checkpoint's tensors (names, dtypes,
    shapes) and quantization_config; split over several files with an index, it passes the loader's checks."""
    exported = json.loads((small / "config.json").read_text())
    config = {k: v for k, v in exported.items() if k != "quantization_config"}
    sparse = write_sparse_checkpoint(tmp_path / "sparse", config, "w_mxfp4", shard_bytes=20_000)
    assert json.loads((sparse / "config.json").read_text()) == exported
    assert len(list(sparse.glob("model-*-of-*.safetensors"))) > 3
    with CheckpointReader(small) as a, CheckpointReader(sparse) as b:
        assert {n: a.info(n) for n in a} == {n: b.info(n) for n in b}
        assert not b["model.layers.1.block_sparse_moe.experts.2.w2.weight"].any()  # a hole reads as zeros
    check_checkpoint_headers(sparse)
    assert plan_checkpoint(sparse, 4) == dataclasses.replace(plan_checkpoint(small, 4), path=str(sparse))
    write_sparse_checkpoint(tmp_path / "float", config)  # without a scheme: the float model's tensors
    with CheckpointReader(small.parent / "float") as a, CheckpointReader(tmp_path / "float") as b:
        assert {n: a.info(n) for n in a} == {n: b.info(n) for n in b}


def test_the_cli_refuses_bad_flags_in_one_line(small, capsys):
    assert cli.main(["plan", str(small), "--devices", "4", "--device-memory", "0.0001", "--max-model-len", "8"]) == 0
    out = capsys.readouterr().out
    rows = {row[:11]: row for row in out.splitlines() if row.startswith("EP ")}
    assert list(rows) == ["EP 4 x TP 1", "EP 2 x TP 2", "EP 1 x TP 4"], out
    assert rows["EP 4 x TP 1"].endswith("no: the weights need 0.00 GiB more")  # 107374 x 0.9 < 114816 bytes
    assert rows["EP 2 x TP 2"].split()[5:] == ["0.00", "128", "219", "yes"]  # (107374 x 0.9 - 68480) // 128
    assert rows["EP 1 x TP 4"].split()[5:] == ["0.00", "128", "398", "yes"]  # (96636 - 45568) // 128
    assert "mixtral, 2 layers (2 MoE, 3 routed experts each)" in out and "whole checkpoint by part (GiB)" in out
    assert cli.main(["plan", str(small), "--devices", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layouts"][1]["weight_bytes"] == 81536
    for argv, message in [
        (["--devices", "0"], "--devices 0: expected a positive number of devices"),
        (["--devices", "2", "--device-memory", "-1"], "--device-memory -1.0: expected a positive number of GiB"),
        (["--devices", "2", "--device-memory", "nan"], "--device-memory nan"),
        (["--devices", "2", "--memory-fraction", "0"], "--memory-fraction 0.0: expected a share of memory in (0, 1]"),
        (["--devices", "2", "--max-model-len", "0"], "--max-model-len 0: expected a positive number of positions"),
    ]:
        assert cli.main(["plan", str(small), *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("quarkmoe plan: error: ") and message in err[0], (argv, err)
    assert cli.main(["plan", str(small / "missing"), "--devices", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plan_help_describes_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--devices N", "--device-memory GiB", "--max-model-len L", "--memory-fraction F", "(default: 0.9)"):
        assert text in out
    assert "(default: None)" not in out
