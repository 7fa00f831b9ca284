"""What every architecture's top module shares: the flat-batch forward, the output head, and loading Hugging
Face-named weights onto the fused layers (q|k|v -> qkv_proj, gate|up -> gate_up_proj)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from thrifty.errors import ModelFileError
from thrifty.models.config import ModelConfig
from thrifty.models.layers import Linear, MergedLinear
from thrifty.models.weight_names import fused_name


class CausalLM(nn.Module):
    """Subclasses set `self.model` (embeddings -> final norm) before calling `_add_head`."""

    config: ModelConfig
    model: nn.Module

    def _add_head(self) -> None:
        self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] for every token of the flat batch."""
        return self.model(input_ids, positions)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype for the rows asked for (the runner passes only the positions it samples);
        the sampler makes the one float32 copy it needs."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; every parameter must be filled exactly once."""
        params = dict(self.named_parameters())
        if self.config.tie_word_embeddings:
            params.pop("lm_head.weight")
        filled: set[str] = set()
        for name, tensor in weights:
            target, shard = fused_name(name)
            if target not in params:
                if "rotary_emb" in name:
                    continue
                raise ModelFileError(f"the checkpoint has a weight this model does not: {name}",
                                     "check that config.json describes these weights")
            if shard is None:
                if params[target].shape != tensor.shape:
                    raise ModelFileError(f"weight {name}: expected shape {tuple(params[target].shape)}, got "
                                         f"{tuple(tensor.shape)}", "check that config.json describes these weights")
                params[target].data.copy_(tensor)
                filled.add(target)
            else:
                module = self.get_submodule(target.rsplit(".", 1)[0])
                try:
                    module.load_shard(shard, target.rsplit(".", 1)[1], tensor)
                except ModelFileError as e:
                    raise ModelFileError(f"weight {name}: {e.message}", e.fix) from None
                filled.add(f"{target}:{shard}")
        self._check_filled(params, filled)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _check_filled(self, params: dict[str, nn.Parameter], filled: set[str]) -> None:
        missing = []
        for name in params:
            module = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, MergedLinear):
                missing += [f"{name}:{s}" for s in module.offsets if f"{name}:{s}" not in filled]
            elif name not in filled:
                missing.append(name)
        if missing:
            raise ModelFileError(f"weights missing from the checkpoint: {', '.join(missing[:5])}",
                                 "check that the checkpoint is complete")
