"""A scheduled step -> input tensors -> model -> logits of the rows that sample -> sampled tokens.

Execution only: the runner neither decides who runs (scheduler) nor owns blocks (block manager); it reads
the block tables it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.engine.cuda_graphs import DecodeGraphs, DecodeRow
from thrifty.engine.kv_cache import PagedKVCache
from thrifty.engine.kv_groups import GroupedKVCache
from thrifty.engine.sampling import Sampler, SamplerOutput
from thrifty.engine.sequence import Sequence
from thrifty.engine.speculative import verify_sequences
from thrifty.engine.step_timing import Stopwatch
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context


@dataclass(slots=True)
class StepInput:
    seq: Sequence
    num_tokens: int
    block_tables: list[list[int]]     # one per KV group (engine/kv_groups.py); one for most models

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last known token (and its drafts), so it yields new ones."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens + len(self.seq.draft_token_ids)


@dataclass(slots=True)
class Verified:
    """A sequence whose drafts were checked this step: the drafts kept, then one token of the target's."""
    seq: Sequence
    token_ids: list[int]

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


@dataclass(slots=True)
class Chunk:
    """One sequence's tokens in a forward: `token_ids` at positions start.., written to its block tables
    (one per KV group, engine/kv_groups.py; one for most models)."""
    token_ids: list[int]
    start: int
    block_tables: list[list[int]]


def forward(model: torch.nn.Module, kv_cache: PagedKVCache | GroupedKVCache, chunks: list[Chunk],
            device: torch.device, watch: Stopwatch | None = None, rows_as_decodes: bool = False) -> torch.Tensor:
    """Hidden states [sum of chunk lengths, H] of one forward over `chunks` (one-token chunks first); each
    chunk's KV lands in its blocks. The target's runner and the draft proposer both run their models here."""
    ids = [t for c in chunks for t in c.token_ids]
    positions = [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
    context_lens = [c.start + len(c.token_ids) for c in chunks]
    metas = [AttentionMetadata.build([c.block_tables[g] for c in chunks], context_lens,
                                     [len(c.token_ids) for c in chunks], kv_cache.spec.block_size,
                                     kv_cache.layers, device, rows_as_decodes=rows_as_decodes)
             for g in range(len(chunks[0].block_tables))]
    layer_group = getattr(kv_cache, "layer_group", None)   # KV group of each layer; None: one group
    meta = metas[0] if layer_group is None else [metas[g] for g in layer_group]
    ids_t, positions_t = torch.tensor(ids, device=device), torch.tensor(positions, device=device)
    if watch is not None:
        watch.lap("inputs")
    with set_forward_context(meta):
        hidden = model(ids_t, positions_t)
    if watch is not None:
        watch.lap("forward")
    return hidden


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache | GroupedKVCache, sampler: Sampler,
                 device: torch.device, rows_as_decodes: bool = False, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv_cache, self.sampler, self.device = model, kv_cache, sampler, device
        self.rows_as_decodes = rows_as_decodes   # deterministic mode (engine/determinism.py)
        self.graphs = graphs                     # CUDA-graph replays of plain decode steps (engine/cuda_graphs.py)
        self.block_size = kv_cache.spec.block_size

    def execute(self, batch: list[StepInput], watch: Stopwatch
                ) -> tuple[list[Sequence], SamplerOutput | None, list[Verified]]:
        """Run one forward over the batch; return the sequences that sampled and their samples, in order, and
        the sequences with speculative drafts and what verification kept of them."""
        batch = sorted(batch, key=lambda b: b.num_tokens != 1)  # one-token queries first (batched decode path)
        chunks = []
        for item in batch:
            start = item.seq.num_computed_tokens
            tokens = item.seq.token_ids + item.seq.draft_token_ids if item.seq.draft_token_ids else item.seq.token_ids
            chunks.append(Chunk(tokens[start:start + item.num_tokens], start, item.block_tables))
        logits = self._replay_decode(batch, chunks, watch)
        if logits is not None:
            return self._sample(batch, logits, watch)
        hidden = forward(self.model, self.kv_cache, chunks, self.device, watch, self.rows_as_decodes)

        sampling = [b for b in batch if b.samples]
        if not sampling:
            return [], None, []
        if any(b.seq.draft_token_ids for b in sampling):
            return self._verify(batch, hidden, watch)
        rows, end = [], 0
        for b in batch:
            end += b.num_tokens
            if b.samples:
                rows.append(end - 1)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        watch.lap("logits")
        return self._sample(sampling, logits, watch)

    def _replay_decode(self, batch: list[StepInput], chunks: list[Chunk], watch: Stopwatch) -> torch.Tensor | None:
        """Logits of the sampling rows of a plain decode step replayed as a CUDA graph; None: run it eagerly."""
        if self.graphs is None or any(len(c.token_ids) != 1 for c in chunks) \
                or any(b.seq.draft_token_ids for b in batch):
            return None
        logits = self.graphs.run([DecodeRow(c.token_ids[0], c.start, c.block_tables[0]) for c in chunks])
        if logits is None:
            return None
        watch.lap("forward")
        rows = [i for i, b in enumerate(batch) if b.samples]
        return logits if len(rows) == len(batch) else logits[torch.tensor(rows, device=self.device)]

    def _sample(self, batch: list[StepInput], logits: torch.Tensor, watch: Stopwatch
                ) -> tuple[list[Sequence], SamplerOutput | None, list[Verified]]:
        """Sample one token for each sequence of `batch` that samples this step, from its row of `logits`."""
        sampling = [b for b in batch if b.samples]
        if not sampling:
            return [], None, []
        seqs = [b.seq for b in sampling]
        out = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                  [s.history for s in seqs])
        watch.lap("sampling")
        return seqs, out, []

    def _verify(self, batch: list[StepInput], hidden: torch.Tensor, watch: Stopwatch
                ) -> tuple[list[Sequence], SamplerOutput | None, list[Verified]]:
        """A step with drafts: logits at the last token and every draft of those sequences, one row elsewhere;
        plain rows are sampled as usual, drafted ones verified."""
        plain_rows, spec_rows, end = [], [], 0
        plain, spec = [], []
        for b in batch:
            end += b.num_tokens
            if not b.samples:
                continue
            k = len(b.seq.draft_token_ids)
            if k:
                spec_rows.extend(range(end - 1 - k, end))
                spec.append(b.seq)
            else:
                plain_rows.append(end - 1)
                plain.append(b.seq)
        logits = self.model.compute_logits(hidden[torch.tensor(plain_rows + spec_rows, device=self.device)])
        watch.lap("logits")
        out = None
        if plain:
            out = self.sampler.sample(logits[:len(plain)], [s.params for s in plain], [s.generator for s in plain],
                                      [s.history for s in plain])
        kept = verify_sequences(self.sampler, logits[len(plain):], spec)
        watch.lap("sampling")
        return plain, out, [Verified(seq, tokens) for seq, tokens in zip(spec, kept)]
