"""LLMEngine: add_request / step / abort. One step = schedule -> run -> postprocess (detokenize, stop, finish)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from thrifty.engine import cuda_graphs, determinism, kv_calibration, kv_groups
from thrifty.engine.block_manager import PrefixCacheStats
from thrifty.engine.kv_cache import KVCacheSpec, check_kv_cache_dtype, kv_cache_dtype
from thrifty.engine.runner import ModelRunner, StepInput, Verified
from thrifty.engine.sampling import Sampler, SamplerOutput, SamplingParams, make_generator
from thrifty.engine.scheduler import Scheduler, SchedulerConfig
from thrifty.engine.sequence import FinishReason, Logprob, Sequence, Status
from thrifty.engine.draft_proposer import DraftModelProposer, check_same_vocabulary
from thrifty.engine.speculative import NgramFirstProposer, NgramProposer, SpeculativeConfig, Speculator
from thrifty.engine.prefill_rate import PrefillRate
from thrifty.engine.step_timing import StepTiming, Stopwatch
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import LoadedModel, load
from thrifty.models.lm_head import check_lm_head
from thrifty.models.weight_spec import parse_weights
from thrifty.ops.kv_quant import is_quantized as quantized


@dataclass(slots=True, frozen=True)
class EngineConfig:
    dtype: str = "auto"
    device: str | None = None               # auto (None): CUDA when present, else cpu
    kv_cache_memory: float = 1.0            # GiB for the KV cache
    num_kv_blocks: int | None = None        # exact block count, overrides kv_cache_memory (tests, benchmarks)
    kv_cache_dtype: str = "auto"            # auto (the model's dtype), bfloat16, float16, float32, int8, fp8_e4m3,
                                            # fp8_e5m2 (int8 / fp8: a bfloat16 scale per token and KV head)
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    scheduler_policy: str = "continuous"
    max_decode_slowdown: float | None = None  # continuous: prefill beside decodes only this much slower (scheduler;
                                              # None: full-budget chunks; `thrifty serve` uses 2.0)
    max_model_len: int | None = None        # default: the model's context, capped by the KV cache
    deterministic: bool = False             # same tokens at any batch size and composition (engine/determinism.py)
    num_threads: int | None = None          # torch CPU threads (default: torch's choice, all cores)
    weights: str = "auto"                   # weight format: auto, bf16, fp32, int8, int4[-gG], fp8, gguf, or a DIR
    lm_head: str = "auto"                   # output head (+ tied embeddings): auto, dense, int8 (auto: with
                                            # quantized weights an untied head in their format, a tied one int8
                                            # on a CPU; thrifty.models.lm_head)
    speculative: SpeculativeConfig | dict | str | None = None   # speculative decoding; None: off
    enforce_eager: bool = False             # CUDA: never replay decode steps as CUDA graphs (engine/cuda_graphs.py)
    free_window_blocks: bool = True         # sliding-window layers free blocks that left their window (False:
                                            # they keep every block, the unbounded reference; engine/kv_groups.py)

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.kv_cache_dtype)
        object.__setattr__(self, "lm_head", check_lm_head(self.lm_head))
        object.__setattr__(self, "speculative", SpeculativeConfig.of(self.speculative))

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.scheduler_policy,
                               max_decode_slowdown=self.max_decode_slowdown)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    time_per_output_token_s: float | None
    accepted_tokens: int | None = None      # speculative drafts kept (None: the request did not speculate)
    draft_tokens: int | None = None         # speculative drafts proposed (None: likewise)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str                   # the output so far that is safe to show (stop-string candidates held back)
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[Logprob]
    usage: Usage


@dataclass(slots=True, frozen=True)
class ValidRequest:
    """A prompt and params that passed `LLMEngine.validate`: add_request takes it without checking again."""
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    tokens_computed: int = 0                 # prompt + decode tokens the model ran
    prompt_tokens_computed: int = 0
    preemptions: int = 0
    kv_slots_allocated: int = 0              # summed over steps: for the kv_waste ratio
    kv_slots_used: int = 0
    kv_seq_steps: int = 0                    # running sequences summed over steps

    @property
    def kv_waste(self) -> float:
        return 1.0 - self.kv_slots_used / self.kv_slots_allocated if self.kv_slots_allocated else 0.0


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(),
                 draft: LoadedModel | None = None) -> None:
        """`draft`: the speculative draft model already loaded (benchmarks reuse one); None: loaded from the
        config when method is draft."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config, self.loaded = config, loaded
        self.tokenizer = loaded.tokenizer
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.dtype)
        groups = kv_groups.kv_groups(loaded.config, config.free_window_blocks)
        specs = kv_groups.group_specs(loaded.config, groups, config.kv_cache_memory, config.block_size, kv_dtype,
                                      config.num_kv_blocks, config.max_num_seqs, config.max_num_batched_tokens)
        spec = specs[0]
        k_transform = kv_calibration.calibrate(loaded) if quantized(kv_dtype) else None
        capture = _graph_capture(config, loaded.device, groups)
        self.kv_cache, self.block_manager = kv_groups.build(loaded.config, groups, specs,
                                                            config.enable_prefix_caching, loaded.device, k_transform,
                                                            scratch_block=capture is not None)
        self.scheduler = Scheduler(config.scheduler_config(), self.block_manager)
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids)
        if config.deterministic:
            determinism.check(loaded.dtype, loaded.weights, loaded.lm_head)
            determinism.pin_row_kernels(loaded.model)
        context = config.max_model_len or loaded.config.max_position_embeddings
        self.max_model_len = min(context, spec.num_slots)
        graphs = None if capture is None else cuda_graphs.DecodeGraphs(
            loaded.model, self.kv_cache, config.max_num_seqs, self.max_model_len, loaded.device, capture)
        self.runner = ModelRunner(loaded.model, self.kv_cache, Sampler(self.eos_token_ids), loaded.device,
                                  rows_as_decodes=config.deterministic, graphs=graphs)
        self.speculator = _speculator(config, loaded, spec, self.runner.sampler, draft)
        self.stats = EngineStats()
        self.last_step_timing = StepTiming()     # where the last step's time went, phase by phase
        self.prefill_rate = PrefillRate()        # prompt tokens/s under load: admission by deadline reads it
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model: str, **options) -> LLMEngine:
        config = EngineConfig(**options)
        return cls(load(model, config.dtype, config.device, weights=config.weights, lm_head=config.lm_head), config)

    # ---- requests ----------------------------------------------------------------------------------
    def validate(self, prompt: str | list[int], params: SamplingParams) -> ValidRequest:
        """The request with its prompt's token ids, or InvalidRequestError; touches no state."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "", param="params")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", "send at least one token", param="prompt")
        vocab = self.loaded.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's context holds {self.max_model_len} "
                f"(prompt plus at least one output token)", "shorten the prompt", param="prompt")
        return ValidRequest(prompt if isinstance(prompt, str) else None, ids, params)

    def add_request(self, prompt: str | list[int] | ValidRequest, params: SamplingParams | None = None,
                    request_id: str | None = None, extra_key: str | None = None) -> str:
        """`prompt`: text, token ids, or what validate() returned (then `params` is ignored: not checked twice)."""
        valid = prompt if isinstance(prompt, ValidRequest) else self.validate(prompt, params or SamplingParams())
        prompt, ids, params = valid.prompt, valid.prompt_token_ids, valid.params
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "", param="request_id")
        seq = Sequence(request_id, prompt, ids, params, extra_key=extra_key,
                       generator=make_generator(params.seed, self.loaded.device))
        seq.detokenizer = self.tokenizer.incremental_detokenizer(ids, params.skip_special_tokens)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.release(request_id)
        if seq is not None:
            seq.status, seq.finish_reason = Status.FINISHED, FinishReason.ABORT
        return seq is not None

    def run(self, prompts: list[str | list[int]], params: list[SamplingParams],
            on_finish: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Add every request (all validated first), step until all finish; final outputs in the prompts' order."""
        valid = [self.validate(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        ids = [self.add_request(v) for v in valid]
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                    if on_finish is not None:
                        on_finish(out)
        return [done[i] for i in ids]

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_stats(self) -> None:
        """Forget the prefix cache and every counter: what ran so far (a probe, a warm-up) was not traffic."""
        self.block_manager.reset_prefix_cache()
        self.block_manager.stats = PrefixCacheStats()
        self.stats = EngineStats()
        if self.speculator is not None:
            self.speculator.reset_stats()

    # ---- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.last_step_timing = timing = StepTiming()
        started = time.perf_counter()
        watch = Stopwatch(timing)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        if self.speculator is not None:
            for request_id in plan.preempted:       # recomputed from scratch: the draft's KV goes too
                self.speculator.release(request_id)
        if not plan.num_tokens:
            return []
        tables = getattr(self.block_manager, "block_tables", None)
        batch = [StepInput(self._requests[rid], n, tables(rid) if tables else [self.block_manager.block_table(rid)])
                 for rid, n in plan.num_tokens.items()]
        watch.lap("schedule")
        prefill_budget = self.scheduler.prefill_budget
        rows = _prompt_and_decode_rows(batch) if prefill_budget is not None else None
        sampled, samples, verified = self.runner.execute(batch, watch)
        kept = {v.seq.request_id: v.num_accepted for v in verified}
        prompt_before = self.stats.prompt_tokens_computed
        for item in batch:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(item.num_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += item.num_tokens
            if seq.draft_token_ids:
                self._roll_back(seq, kept[seq.request_id])
            else:
                self.block_manager.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        self._account(plan.total_tokens)
        outputs = self._postprocess(sampled, samples) if samples is not None else []
        if verified:
            outputs += self._postprocess_verified(verified)
        watch.lap("postprocess")
        self.prefill_rate.observe(self.stats.prompt_tokens_computed - prompt_before, time.perf_counter() - started)
        if rows is not None:
            prefill_budget.observe(time.perf_counter() - started, *rows)
        return outputs

    def _roll_back(self, seq: Sequence, num_accepted: int) -> None:
        """Forget the KV of the drafts verification rejected: their slots go back to the block manager, and
        only tokens whose KV the cache now holds (the kept drafts among them) may be hashed for prefix hits."""
        draft = seq.draft_token_ids
        seq.num_computed_tokens -= len(draft) - num_accepted
        self.block_manager.trim(seq.request_id, seq.num_computed_tokens)
        self.block_manager.cache_full_blocks(seq.request_id, seq.token_ids + draft[:num_accepted],
                                             seq.num_computed_tokens)

    def _account(self, tokens: int) -> None:
        s = self.stats
        s.steps += 1
        s.tokens_computed += tokens
        bs = self.block_manager.block_size
        for seq in self.scheduler.running:
            allocated = len(self.block_manager.block_table(seq.request_id)) * bs
            s.kv_slots_allocated += allocated
            s.kv_slots_used += min(seq.num_computed_tokens, allocated)
            s.kv_seq_steps += 1

    def _postprocess(self, seqs: list[Sequence], samples: SamplerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for i, seq in enumerate(seqs):
            token = samples.token_ids[i]
            seq.output_token_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
            if samples.logprobs[i] is not None:
                seq.logprobs.append(Logprob(token, samples.logprobs[i], samples.top_logprobs[i]))
            old_text = seq.text
            seq.text += seq.detokenizer.add(token)
            self._check_stop(seq, token, old_text)
            if seq.finished and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()  # a trailing partial character, as decode() shows it
            if seq.finished:
                self._finish(seq)
            outputs.append(self._output(seq, [token]))
        return outputs

    def _postprocess_verified(self, verified: list[Verified]) -> list[RequestOutput]:
        """Append each sequence's kept drafts and the target's token one at a time, every stop condition checked
        after each, so nothing past a stop is emitted; one output per sequence with all of its new tokens."""
        now = time.monotonic()
        outputs = []
        for v in verified:
            seq = v.seq
            self.speculator.record(seq, len(seq.draft_token_ids), v.num_accepted)
            seq.draft_token_ids = []
            new: list[int] = []
            for token in v.token_ids:
                new.append(token)
                seq.output_token_ids.append(token)
                old_text = seq.text
                seq.text += seq.detokenizer.add(token)
                self._check_stop(seq, token, old_text)
                if seq.finished:
                    break
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
            if seq.finished and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()
            if seq.finished:
                self._finish(seq)
            outputs.append(self._output(seq, new))
        return outputs

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._requests.pop(seq.request_id, None)
        if self.speculator is not None:
            self.speculator.release(seq.request_id)

    def _check_stop(self, seq: Sequence, token: int, old_text: str) -> None:
        p = seq.params
        n = len(seq.output_token_ids)
        if n >= p.min_tokens and (token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)):
            seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, FinishReason.STOP, token
            return
        hit = seq.stop_checker.check(old_text, seq.text[len(old_text):])
        if hit.finished and n >= p.min_tokens:
            seq.text = hit.text
            seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, FinishReason.STOP, hit.stop
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.status, seq.finish_reason = Status.FINISHED, FinishReason.LENGTH

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        visible = len(seq.text) if seq.finished else seq.stop_checker.streamable(seq.text)
        visible = max(visible, seq.num_streamed_chars)
        delta = seq.text[seq.num_streamed_chars:visible]
        seq.num_streamed_chars = visible
        spec = seq.spec if seq.spec is not None and seq.spec.num_drafts else None
        usage = Usage(seq.num_prompt_tokens, seq.num_cached_tokens, len(seq.output_token_ids),
                      seq.time_to_first_token(), seq.time_per_output_token(),
                      spec.num_accepted_tokens if spec else None, spec.num_draft_tokens if spec else None)
        return RequestOutput(
            seq.request_id, seq.prompt, seq.prompt_token_ids, seq.text[:visible], list(seq.output_token_ids),
            delta, new_tokens, seq.finished, seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
            list(seq.logprobs), usage)


def _graph_capture(config: EngineConfig, device: torch.device, groups: list[kv_groups.KVGroup]
                   ) -> cuda_graphs.Capture | None:
    """How decode steps are captured, or None: eager on CPUs, when asked, in deterministic mode (its padding
    of one-row calls is eager-only), and for models with sliding-window KV groups (their grouped tables)."""
    if config.enforce_eager or config.deterministic or len(groups) != 1 or groups[0].window is not None:
        return None
    return cuda_graphs.capturer(device)


def _speculator(config: EngineConfig, loaded: LoadedModel, kv_spec: KVCacheSpec, sampler: Sampler,
                draft: LoadedModel | None) -> Speculator | None:
    """The speculator of `config.speculative` (None: off); method draft loads the draft model beside the target."""
    spec = config.speculative
    if not spec.enabled:
        return None
    if spec.method != "draft":
        return Speculator(spec)
    proposer = _draft_proposer(config, loaded, kv_spec, sampler, draft)
    if spec.ngram_first:
        proposer = NgramFirstProposer(NgramProposer(spec.ngram_min, spec.ngram_max), proposer)
    return Speculator(spec, proposer)


def load_draft(config: EngineConfig, target: LoadedModel) -> LoadedModel:
    """The draft model in its own weight format (default: the target's, auto when that is a folder)."""
    spec = config.speculative
    weights = spec.draft_weights or (config.weights if parse_weights(config.weights).kind != "dir" else "auto")
    return load(spec.draft_model, target.dtype, target.device, weights=weights, lm_head=config.lm_head)


def _draft_proposer(config: EngineConfig, loaded: LoadedModel, kv_spec: KVCacheSpec, sampler: Sampler,
                    draft: LoadedModel | None) -> DraftModelProposer:
    """Refuse a draft with another vocabulary, and give it a KV cache of its own: as many tokens as the
    target's unless draft_kv_cache_memory says otherwise."""
    spec = config.speculative
    draft = draft or load_draft(config, loaded)
    check_same_vocabulary(loaded, draft, spec.draft_model)
    num_blocks = None if spec.draft_kv_cache_memory is not None else kv_spec.num_blocks
    draft_kv = KVCacheSpec.from_budget(draft.config, spec.draft_kv_cache_memory or 0.0, kv_spec.block_size,
                                       kv_spec.dtype, num_blocks)
    return DraftModelProposer(draft, draft_kv, loaded.config.vocab_size, sampler, config.enable_prefix_caching)


def _prompt_and_decode_rows(batch: list[StepInput]) -> tuple[int, int]:
    """(prompt tokens, decoding requests) of a step, before it runs: a decode with drafts is one decode."""
    prompt = decodes = 0
    for item in batch:
        if item.seq.num_tokens - item.seq.num_computed_tokens > 1:
            prompt += item.num_tokens
        else:
            decodes += 1
    return prompt, decodes
