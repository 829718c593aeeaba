"""celoss benchmark suite: ``python -m benchmarks [ce|linear|family|all] [--quick|--full] ...``.

Layout:
  methods.py  the operations (ce, linear, focal, sigmoid_focal, bce, distill), their inputs and
              roofline floors, and the registry of methods per operation (celoss backends and peers;
              every import is lazy, an unavailable method is a row that says why)
  measure.py  timing (synchronized clocks / CUDA events), peak extra memory (peak RSS of the worker
              process over its baseline on CPU, torch.cuda.max_memory_allocated delta on GPU) and the
              machine's ceilings (large-copy bandwidth, large-matmul FLOP/s)
  worker.py   the child process that runs cells (one fresh process per method by default)
  runner.py   the parent side: worker processes, per-cell timeout, OOM/timeout marking, progress bar
  suites.py   the presets: quick (the default), full, gpu (the lent-GPU subset), tiny (dry runs)
  report.py   markdown table, CSV and PNG plots into benchmarks/results/<device>-<date>/
"""
