"""Weight formats and quantizers.

qtensor.py   QTensor (integer weights + group scales) and round-to-nearest quantizers
kernels.py   packed formats and their matmul kernels (int8, int4, int8 in groups, fp8) behind models.layers.Linear
spec.py      the `weights=` option
loading.py   building a model straight into a weight format
gguf_native.py  GGUF blocks -> QTensor without requantizing
checkpoint.py   quantized folders (safetensors + config) written by `thrifty quantize`
"""
