"""Kernels: the fused kept steps (native CPU: ``kept_sgd_cpu``; Triton on CUDA: ``triton_kept``;
both as ``torch.library`` ops: ``ops``), the fused evolve update (native CPU: ``evolve_cpu``;
Triton on CUDA: ``triton_evolve``; ops in ``ops``) and 2:4 semi-structured kernels on CUDA
(``semi_structured``, ``torch.sparse`` semi-structured tensors).

Experimental until verified on a GPU: the CUDA paths here are tested on the CPU only (the Triton
kernels under ``TRITON_INTERPRET=1``); ``benchmarks/gpu_check.py`` runs the CUDA checks in one
call."""
