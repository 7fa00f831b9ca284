"""Benchmarks: `thrifty bench throughput` (engine policies and peers over concurrency) and `thrifty bench prefix`.

Each suite prints markdown tables and can write a JSON report (with the hardware, model, config and date)
and a PNG plot. Peers: Hugging Face transformers (`generate` one request at a time) and llama.cpp
(llama-cpp-python's low-level batch API), both on the same GGUF weights.
"""
