"""Bad Hugging Face model folders (config.json + *.safetensors + tokenizer.json) fail with a typed error that
names the file, never a raw KeyError / safetensors / JSON exception, and never hang; a good one loads and
gives the same logits as the GGUF it was written from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from thrifty.errors import ThriftyError
from thrifty.models import loader
from thrifty.models.gguf_file import GGUFFile
from thrifty.models.tokenizer import Tokenizer
from damage import damaged
from tiny_gguf import TinySpec, write_tiny_gguf

SMALL = TinySpec(num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)


def hf_config(gguf: Path) -> dict:
    c = GGUFFile(gguf).model_config()
    return {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": c.num_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "vocab_size": c.vocab_size, "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings}


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("hf-src") / "small.gguf", SMALL)


@pytest.fixture(scope="module")
def hf_folder(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF's model as transformers would save it: config.json, model.safetensors, tokenizer files."""
    folder = tmp_path_factory.mktemp("hf")
    _, weights, tokenizer = loader.read_checkpoint(gguf)
    save_file({name: t.contiguous() for name, t in weights}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(gguf)))
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return folder


def copy_of(folder: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    return dest


def loads_or_names_the_cause(path: Path) -> None:
    """The whole load (config, weights, tokenizer) and one tokenizer round trip: a typed error or success."""
    try:
        loaded = loader.load(path, dtype="float32", weights="fp32")
        loaded.tokenizer.decode(loaded.tokenizer.encode("hello"))
    except ThriftyError as e:
        assert e.fix and "\n" not in str(e), str(e)


def test_the_folder_loads_like_its_gguf(hf_folder: Path, gguf: Path) -> None:
    a, b = loader.load(hf_folder, dtype="float32", weights="fp32"), loader.load(gguf, dtype="float32", weights="fp32")
    assert isinstance(a.tokenizer, Tokenizer)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


BAD_CONFIGS = [
    "", "{", "[]", "null", '"text"', "{\"architectures\": \"Qwen2ForCausalLM\"}",
]
BAD_COUNTS = [None, "16", -1, 0, 1.5, 10 ** 12, [16], {"a": 1}, True]
BAD_NUMBERS = ["16", -1, 0, float("nan"), float("inf"), [16], {"a": 1}, True]
OPTIONAL = {"rope_theta", "rms_norm_eps"}  # absent: a default that fits any weights


@pytest.mark.parametrize("key, bad", [(k, BAD_COUNTS) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                                "num_attention_heads", "num_key_value_heads",
                                                                "vocab_size")]
                         + [(k, BAD_NUMBERS) for k in ("rope_theta", "rms_norm_eps")])
def test_bad_config_values_are_named(hf_folder: Path, tmp_path: Path, key: str, bad: list) -> None:
    folder = copy_of(hf_folder, tmp_path / "m")
    good = json.loads((folder / "config.json").read_text())
    for value in bad:
        if value is None and key in (*OPTIONAL, "num_key_value_heads"):
            continue  # null reads as absent
        (folder / "config.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ThriftyError) as exc:
            loader.load(folder, dtype="float32", weights="fp32")
        assert key in exc.value.message or "vocab_size x hidden_size" in exc.value.message, (value, exc.value.message)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
    if key in OPTIONAL:
        loader.load(folder, dtype="float32", weights="fp32")
    else:
        with pytest.raises(ThriftyError):  # the key, or (num_key_value_heads -> num_attention_heads) a k_proj shape
            loader.load(folder, dtype="float32", weights="fp32")


def test_fuzzed_folders_give_typed_errors_only(hf_folder: Path, tmp_path: Path) -> None:
    """Cuts anywhere and random bytes in each file's head: a typed error naming the cause, or a model that
    still loads; never a bare exception, never a hang."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "m"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        original = (hf_folder / name).read_bytes()
        for case in damaged(original, min(len(original), 600), rng, cuts=25, flips=40):
            copy_of(hf_folder, folder)
            (folder / name).write_bytes(case)
            loads_or_names_the_cause(folder)


def test_wrong_shapes_and_names_in_the_weights(hf_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(hf_folder / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    variants = {  # what the error must name
        name: {**tensors, name: torch.zeros(3, 3)},
        "layers.0.self_attn.qkv_proj.weight:q": {k: v for k, v in tensors.items() if k != name},
        "model.layers.7.mlp.up_proj.weight": {**tensors, "model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)},
    }
    for named, variant in variants.items():
        folder = copy_of(hf_folder, tmp_path / "m")
        save_file(variant, str(folder / "model.safetensors"))
        with pytest.raises(ThriftyError) as exc:
            loader.load(folder, dtype="float32", weights="fp32")
        assert named in exc.value.message, exc.value.message
