"""Quantized model folders, as `thrifty quantize --out DIR` writes them and `--model DIR` / `weights=DIR` reads them.

    config.json                       Hugging Face-style config + "quantization_config" (method, bits, group, ...)
    model-00001-of-0000N.safetensors  weights; a linear layer P (Hugging Face name, unfused: q_proj, k_proj, ...)
                                      is stored as P.qweight, P.scales [N, groups] float32, P.offsets (asymmetric);
                                      qweight: int8 [N, K] (8-bit), uint8 [N, K/2] (4-bit: even column in the
                                      low nibble) or float8_e4m3fn [N, K]; its format "int:BITS:GROUP" in the
                                      file's metadata. Everything else: embeddings bf16, vectors float32.
    model.safetensors.index.json      which file holds which tensor (all files must be present)
    tokenizer.json, tokenizer_config.json, generation_config.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thrifty.errors import ModelFileError
from thrifty.models.config import ModelConfig
from thrifty.quant.qtensor import QTensor

INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 << 30
_ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def is_quantized_folder(path: Path) -> bool:
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not ours: the plain folder reader names what is wrong with it
    return isinstance(raw, dict) and "quantization_config" in raw


def read_config(path: Path) -> ModelConfig:
    from thrifty.models import hf_folder

    return hf_folder.read_config(Path(path))


def quantization_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


# ---- writing --------------------------------------------------------------------------------------------
def _hf_config(config: ModelConfig, quant: dict) -> dict:
    return {
        "architectures": [_ARCH.get(config.architecture, "LlamaForCausalLM")],
        "model_type": config.architecture,
        "num_hidden_layers": config.num_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "_name_or_path": config.name, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "thrifty", "format_version": FORMAT_VERSION, **quant},
    }


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def _tokenizer_files(folder: Path, tokenizer) -> None:
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str())
    cfg = {"add_bos_token": tokenizer.add_bos_token, "chat_template": tokenizer.chat_template}
    for key, tid in (("bos_token", tokenizer.bos_token_id), ("eos_token", tokenizer.eos_token_id),
                     ("pad_token", tokenizer.pad_token_id), ("unk_token", tokenizer.unk_token_id)):
        if tid is not None:
            cfg[key] = tokenizer.id_to_token(tid)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tokenizer.stop_token_ids)}))


def save(folder: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor | QTensor], tokenizer,
         quant: dict, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a quantized folder. `tensors`: Hugging Face names; linear layers as QTensors under `P.weight`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = []      # a layer's qweight, scales and offsets stay in one file
    formats: dict[str, str] = {}
    for name, t in tensors.items():
        if isinstance(t, QTensor):
            prefix = name.removesuffix(".weight")
            if t.kind == "fp8":
                q = t.q.contiguous()
            elif t.bits == 4:
                q = _pack_nibbles(t.q)
            else:
                q = t.q.to(torch.int8).contiguous()
            group = {f"{prefix}.qweight": q, f"{prefix}.scales": t.scale.float().contiguous()}
            if t.offset is not None:
                group[f"{prefix}.offsets"] = t.offset.float().contiguous()
            groups.append(group)
            formats[prefix] = f"{t.kind}:{t.bits}:{t.group_size}"
        else:
            groups.append({name: (t.to(torch.bfloat16) if t.dim() >= 2 else t.float()).contiguous()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group.values())
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += nbytes
    flat = {n: t for shard in shards for n, t in shard.items()}
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        meta = {p: f for p, f in formats.items() if f"{p}.qweight" in shard}
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for t in flat.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(_hf_config(config, quant), indent=2))
    _tokenizer_files(folder, tokenizer)
    return folder


# ---- reading --------------------------------------------------------------------------------------------
def _files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if not index.is_file():
        raise ModelFileError(f"{folder} has no {INDEX}", "write the folder again with thrifty quantize")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ModelFileError(f"{index} is not readable ({e})", "write the folder again with thrifty quantize") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ModelFileError(f"{folder} is missing {len(missing)} of {len(names)} weight shards: {', '.join(missing)}",
                             "copy the whole folder, or quantize again")
    return [folder / n for n in names]


def _weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            formats = f.metadata() or {}
            keys = set(f.keys())
            for prefix, fmt in formats.items():
                kind, bits, group = fmt.split(":")
                q = f.get_tensor(f"{prefix}.qweight")
                if kind == "int" and int(bits) == 4:
                    q = _unpack_nibbles(q)
                offsets = f.get_tensor(f"{prefix}.offsets") if f"{prefix}.offsets" in keys else None
                yield f"{prefix}.weight", QTensor(q, f.get_tensor(f"{prefix}.scales"), offsets, int(bits), int(group),
                                                  kind)
            skip = {f"{p}.{s}" for p in formats for s in ("qweight", "scales", "offsets")}
            for name in f.keys():
                if name not in skip:
                    yield name, f.get_tensor(name).float()


def read(folder: str | Path):
    """(config, weights iterator, tokenizer) of a quantized folder."""
    from thrifty.models.tokenizer import Tokenizer

    folder = Path(folder)
    files = _files(folder)
    return read_config(folder), _weights(files), Tokenizer.from_hf_folder(folder)
