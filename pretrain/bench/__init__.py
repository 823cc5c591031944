"""The measurement code the tools/bench_*.py scripts call, kept out of the model and
parallel packages (which hold only what training runs):

* `memory_kernels`: the kernel rows of tools/bench_kernels.py: scoring and the bag, forward and
  backward, PyTorch vs Triton, and every launch candidate of the autotuned kernels (--configs).
* `layer`: a config's memory layer, whole model and each sublayer kind, forward+backward,
  Triton vs PyTorch paths (tools/bench_kernels.py --layer).
* `parallel`: memory parallelism P = 1 vs P > 1 on spawned gloo ranks: step time, per-rank
  memory and traffic (tools/bench_parallel.py).
* `values`: the value-pool update, dense vs row-sparse, against the pool size
  (tools/bench_values.py).
* `model`: the small one-memory-layer model config `parallel` and `values` build.
* `gpu_report`: the benchmarks/ record of what tools/gpu_check.sh brought back (tools/gpu_report.py).
"""
