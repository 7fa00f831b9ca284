"""Architecture name (ModelConfig.architecture, from the GGUF or config.json) -> the torch module that runs it."""
from __future__ import annotations

from torch import nn

from thrifty.errors import UnsupportedModelError
from thrifty.models.config import ModelConfig


def model_class(config: ModelConfig) -> type[nn.Module]:
    from thrifty.models.gemma3 import Gemma3ForCausalLM
    from thrifty.models.qwen2 import Qwen2ForCausalLM

    classes = {"qwen2": Qwen2ForCausalLM, "llama": Qwen2ForCausalLM, "gemma3": Gemma3ForCausalLM}
    if config.architecture not in classes:
        raise UnsupportedModelError(f"no model runs the '{config.architecture}' architecture",
                                    f"use one of {', '.join(classes)}")
    return classes[config.architecture]
