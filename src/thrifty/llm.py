"""The offline API: `LLM(model, **options).generate(prompts, SamplingParams)`."""
from __future__ import annotations

from typing import Sequence as Seq

from tqdm.auto import tqdm

from thrifty.engine.engine import LLMEngine, RequestOutput
from thrifty.engine.sampling import SamplingParams


class LLM:
    """A model and an engine for batch work. Options are EngineConfig's fields (dtype, kv_cache_memory,
    block_size, enable_prefix_caching, max_num_seqs, max_num_batched_tokens, scheduler_policy, ...)."""

    def __init__(self, model: str, **options) -> None:
        self.engine = LLMEngine.from_model(model, **options)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            return self.engine.run(list(prompts), per_prompt, on_finish=lambda _: bar.update(1))

    def chat(self, conversations: list[dict] | Seq[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Like generate, with each conversation rendered by the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], params, use_tqdm)
