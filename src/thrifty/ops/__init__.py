"""The tensor ops models are built from, below models/ and above the native kernels: paged attention, its
per-step metadata and forward context, one layer's KV storage, and the choice of matmul dtype."""
