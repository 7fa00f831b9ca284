"""thrifty.quant."""
