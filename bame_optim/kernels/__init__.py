"""2:4 semi-structured kernels on CUDA (``torch.sparse`` semi-structured tensors).

Experimental until verified on a GPU: every path here is tested on the CPU fallback only;
``benchmarks/gpu_check.py`` runs the CUDA checks in one call."""
