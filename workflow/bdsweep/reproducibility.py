"""Bit-reproducible arithmetic on CPU: what fixes it, and what cannot.

The same seed gives the same weights on one machine with one thread count: every stage and
defense seeds its own generators from its arguments, never from what ran before. Two further
things change float results:

- **The instruction set.** MKL, oneDNN and ATen each pick AVX-512 or AVX2 kernels for the CPU
  they run on, and these round differently. :data:`CPU_ENVIRONMENT` pins all three to AVX2 (any
  x86-64 CPU since 2013). It must be in the environment before torch is imported; subprocesses
  inherit it. The test suite sets it, with one thread (``tests/conftest.py``).
- **The thread count.** ATen and oneDNN split reductions (BatchNorm statistics, convolution
  weight gradients) over threads and sum the parts in another order, so a training with 1 and
  with 2 threads differs in the last bits after the first step and drifts apart from there
  (``tests/test_reproducibility.py`` measures it on the small CNN). Neither disabling oneDNN nor
  MKL's strict mode removes this for every layer shape, so bdsweep does not promise it: runs that
  must be compared bit for bit use the same thread count (the workflow's jobs run one torch thread
  per run). On CUDA, cuDNN's kernel choices make runs close but not bit-identical.
"""

from __future__ import annotations

# Not importing torch here: the variables must be set before torch is first imported.
CPU_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
}
