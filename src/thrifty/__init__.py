"""thrifty: LLM serving at the lowest cost per token."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    # Lazy, so `thrifty --help` and the zoo do not pay for importing torch.
    if name == "LLM":
        from thrifty.llm import LLM
        return LLM
    if name == "SamplingParams":
        from thrifty.engine.sampling import SamplingParams
        return SamplingParams
    if name == "RequestOutput":
        from thrifty.engine.engine import RequestOutput
        return RequestOutput
    raise AttributeError(name)
