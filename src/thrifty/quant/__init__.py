"""Weight formats and their kernels, below models/ (which builds its linear layers on them).

qtensor.py   QTensor (integer weights + group scales) and round-to-nearest quantizers
kernels.py   packed formats and their matmul kernels (int8, int4, int8 in groups, fp8) behind models.layers.Linear

Loading a model into a format is models/ (weight_spec.py, quantized.py, gguf_native.py,
quantized_checkpoint.py); the quantizers that calibrate on a running model (RTN, AWQ, GPTQ) are quantizers/.
"""
