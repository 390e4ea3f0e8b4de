"""Benchmarks: the engine, KV transfer, tensor parallelism and the serving comparison, each
printing its figures beside the machine's own limits measured in the same run. They import the
runtime; nothing in the runtime imports them."""
