"""Quantizers, above models/: they run a model to calibrate it (AWQ, GPTQ; RTN needs no data) and write a
folder of quantized weights (thrifty.models.quantized_checkpoint) that `weights=DIR` loads.

quantize.py  the `thrifty quantize` pipeline: layer by layer, each calibrated on what the quantized layers before feed it
awq.py       activation-aware scaling, clipping and unbiasing of int4 groups
gptq.py      GPTQ with act-order
data.py      calibration and evaluation text windows
"""
