"""Kernels: fused steps on the kept weights and the fused evolve update (CPU and CUDA), and 2:4
semi-structured kernels (CUDA). The native extension is built, and Triton imported, only when a
step first needs them.

CPU, native C++ (sources in ``csrc/``):

* :mod:`.kept_sgd_cpu`, :mod:`.kept_adamw_cpu`: the fused kept-SGD and kept-AdamW steps over
  the compact state (gather, update and scatter in one pass), which
  :mod:`bame_optim.optim.functional` runs with ``fused=None`` (where they support the tensors)
  or ``fused=True``; kept-SGD is bit-identical to the eager path, kept-AdamW's moments are too;
* :mod:`.evolve_cpu`: the fused evolve update (LMA scores, top-n proposal, SAD, the OBF
  oscillation EMA and block norms in one pass per parameter), bit-identical to the ``core``
  functions;
* :mod:`.native`: builds the one extension of both on first use into a cache folder named
  after everything that makes a build incompatible, loads it and probes it once
  (``BAME_OPTIM_NO_NATIVE`` disables it, ``BAME_OPTIM_REQUIRE_NATIVE`` makes a failed build an
  error); :mod:`.build` pre-builds it (``python -m bame_optim.kernels.build``).

CUDA:

* :mod:`.triton_kept` (kernels in :mod:`._triton_kept_kernels`): the same fused steps in
  Triton, and :mod:`.triton_evolve` the fused evolve update; :mod:`.ops` registers them as
  ``torch.library`` custom ops (CUDA:
  Triton; CPU: the native or eager path; a fake implementation for ``torch.compile``);
* :mod:`.semi_structured`, :mod:`.semi_structured_training`: 2:4 semi-structured
  (``torch.sparse``) kernels for inference and training, chosen per layer by measurement.

Experimental until verified on a GPU: the CUDA paths are tested on the CPU only (the Triton
kernels under ``TRITON_INTERPRET=1``); ``python -m tools.gpu_check`` runs the CUDA checks in one
call."""
