"""A scheduled step -> input tensors -> model -> logits of the rows that sample -> sampled tokens.

Execution only: the runner neither decides who runs (scheduler) nor owns blocks (block manager); it reads
the block tables it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.engine.kv_cache import PagedKVCache
from thrifty.engine.sampling import Sampler, SamplerOutput
from thrifty.engine.sequence import Sequence
from thrifty.engine.step_timing import Stopwatch
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context


@dataclass(slots=True)
class StepInput:
    seq: Sequence
    num_tokens: int
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last known token, so it yields a new one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, sampler: Sampler,
                 device: torch.device, rows_as_decodes: bool = False) -> None:
        self.model, self.kv_cache, self.sampler, self.device = model, kv_cache, sampler, device
        self.rows_as_decodes = rows_as_decodes   # deterministic mode (engine/determinism.py)
        self.block_size = kv_cache.spec.block_size

    def execute(self, batch: list[StepInput], watch: Stopwatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one forward over the batch; return the sequences that sampled and their samples, in order."""
        batch = sorted(batch, key=lambda b: b.num_tokens != 1)  # one-token queries first (batched decode path)
        ids: list[int] = []
        positions: list[int] = []
        for item in batch:
            start = item.seq.num_computed_tokens
            ids.extend(item.seq.token_ids[start:start + item.num_tokens])
            positions.extend(range(start, start + item.num_tokens))
        meta = AttentionMetadata.build(
            [b.block_table for b in batch],
            [b.seq.num_computed_tokens + b.num_tokens for b in batch],
            [b.num_tokens for b in batch], self.block_size, self.kv_cache.layers, self.device,
            rows_as_decodes=self.rows_as_decodes)
        ids_t, positions_t = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        watch.lap("inputs")
        with set_forward_context(meta):
            hidden = self.model(ids_t, positions_t)
        watch.lap("forward")

        sampling = [b for b in batch if b.samples]
        if not sampling:
            return [], None
        rows, end = [], 0
        for b in batch:
            end += b.num_tokens
            if b.samples:
                rows.append(end - 1)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        watch.lap("logits")
        seqs = [b.seq for b in sampling]
        out = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                  [s.history for s in seqs])
        watch.lap("sampling")
        return seqs, out
