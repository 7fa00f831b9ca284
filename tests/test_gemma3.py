"""Gemma 3 against transformers' Gemma3ForCausalLM built from the same weights: a tiny random model with an
8-token window on prompts many windows long (fed whole, in chunks, token by token through the paged cache),
and the real gemma-3-270m on a prompt longer than its 512-token window."""
from __future__ import annotations

import pytest
import torch

from model_reference import SingleSequence, greedy, hf_greedy, load_hf_gemma3, load_thrifty
from tiny_gguf import tiny_gemma3, write_tiny_gguf


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gemma") / "gemma3.gguf", tiny_gemma3())


def test_config_reads_the_layer_pattern(tiny_gemma):
    _, config = load_thrifty(tiny_gemma)
    assert config.architecture == "gemma3" and config.tie_word_embeddings
    assert config.layer_windows == [8, None, 8, None]
    assert config.rope_local_theta == 10000.0 and config.rope_theta == 1e6


@pytest.mark.parametrize("block_size", [4, 16])
def test_logits_match_transformers_across_many_windows(tiny_gemma, block_size):
    ours, config = load_thrifty(tiny_gemma)
    hf = load_hf_gemma3(tiny_gemma)
    prompt = torch.randint(0, config.vocab_size, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    assert rel_l2(SingleSequence(ours, config, block_size).step(prompt), expected[-1]) < 1e-5
    seq = SingleSequence(ours, config, block_size, seed=7)
    seq.step(prompt[:13])
    seq.step(prompt[13:40])       # a chunk over a cached prefix longer than the window
    for i in range(40, len(prompt)):
        assert rel_l2(seq.step([prompt[i]]), expected[i]) < 1e-5


def test_greedy_matches_transformers_generate(tiny_gemma):
    ours, config = load_thrifty(tiny_gemma)
    hf = load_hf_gemma3(tiny_gemma)
    prompt = list(range(100, 140))
    expected = hf_greedy(hf, prompt, 24)
    assert greedy(ours, config, prompt, 24) == expected
    assert greedy(ours, config, prompt, 24, chunk=7) == expected


def test_chat_template_is_gemmas_when_the_file_has_none():
    from thrifty.models.chat_template import ChatTemplate, GEMMA3_TEMPLATE

    text = ChatTemplate(GEMMA3_TEMPLATE).render(
        bos_token="<bos>", add_generation_prompt=True,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.real
def test_real_gemma_matches_transformers_past_the_window():
    """gemma-3-270m, float32, a 700-token prompt (the 512-token window matters): logits of the prefill and of
    decodes within 1e-4 relative L2, greedy continuation identical."""
    from thrifty.models import zoo

    path = zoo.resolve("gemma-3-270m")
    ours, config = load_thrifty(path)
    hf = load_hf_gemma3(path)
    prompt = [2] + torch.randint(10, 200_000, (699,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    seq = SingleSequence(ours, config, block_size=16, num_blocks=64)
    seq.step(prompt[:600])
    for i in range(600, len(prompt)):
        got = seq.step([prompt[i]])
        assert rel_l2(got, expected[i]) < 1e-4, i
    text = "The history of the printing press begins in " * 80
    from thrifty.models.tokenizer import Tokenizer
    from thrifty.models.gguf_file import GGUFFile

    ids = Tokenizer.from_gguf(GGUFFile(path)).encode(text)[:620]
    expected = hf_greedy(hf, ids, 16)
    assert greedy(ours, config, ids, 16) == expected
    # the engine, local layers freeing the blocks that left the window, chunked prefill
    from thrifty.engine.engine import EngineConfig, LLMEngine
    from thrifty.engine.kv_groups import GroupedBlockManager
    from thrifty.engine.sampling import SamplingParams
    from thrifty.models.loader import load

    engine = LLMEngine(load(path, "float32", weights="fp32"), EngineConfig(dtype="float32", max_num_batched_tokens=256))
    assert isinstance(engine.block_manager, GroupedBlockManager)
    out = engine.run([ids], [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)])
    assert out[0].token_ids == expected
