"""Training-FLOPs accounting: the training FLOPs of an N:M method relative to dense training.

What is counted
---------------
Per Linear / ConvNd layer and per sample, the three products of a training step, each at
``2 * MACs`` FLOPs (one multiply-add = 2 FLOPs):

* forward ``Y = X Wᵀ``,
* input gradient ``dX = dY W`` (also counted for the first layer, whose ``dX`` autograd skips:
  the usual "backward = 2 x forward" convention of RigL, SR-STE and the paper),
* weight gradient ``dW = dYᵀ X``.

For a layer with output ``[C_out, *S_out]`` (batch 1), ``MACs = C_out * prod(S_out) * C_in /
groups * prod(kernel)`` (Linear: ``out * in * tokens``); ``ConvTransposeNd`` layers count
``C_in * prod(S_in) * C_out / groups * prod(kernel)`` and are always dense. The three products
have the same MAC count, kept apart so each method can sparsify them separately. Sizes come
from one batch-1 forward with hooks (:func:`layer_flops`); a layer called twice counts twice.

Each ``nn.MultiheadAttention`` call (embedding ``E``, ``L`` query and ``S`` key tokens per
sample, read from its inputs and ``batch_first``) adds three entries, counted like Linear
layers: its input projection ``in_proj`` (``in_proj_weight [3E, E]``: ``(L + 2S) * E * E``
MACs, or ``q_proj`` / ``k_proj`` / ``v_proj`` when the key and value sizes differ), its
``out_proj`` (``L * E * E``; MHA reads its weight without calling it) and ``attention``, the
products ``Q Kᵀ`` and ``A V`` (``2 * L * S * E`` MACs over all heads; their two backward
products count as ``input_grad`` and ``weight_grad``). The projections are sparse when
:func:`nm_param_groups` makes their weight sparse; ``attention`` has no weight and is always
dense. ``nn.TransformerEncoderLayer``'s inference fast path, which would skip these hooks, is
switched off during the forward. The attention modules of Hugging Face and timm models (the
innermost module whose class name ends in ``Attention``; their projections are Linear or HF
``Conv1D`` layers, counted as such) add the same ``attention`` entry for self-attention over
their ``hidden_states`` ``[B, L, E]`` (``2 * L * L * E`` MACs per sample, masked positions
included, as the dense kernels compute them).

Not counted (elementwise or small next to the products): biases and their gradients, batch
norm, layer norm, activations, pooling, residual additions, softmax and the loss, any other
weight used functionally rather than through its module's ``forward``, the optimizer update,
and the mask work of each method (top-k per block, LMA scores, OBF's EMA, SR-STE's decay term).

Which layers are sparse is decided by :func:`bame_optim.nm_param_groups` with the same ``n, m,
exclude``, so the accounting matches what the optimizer trains: by default the stem and the
classifier are dense, and so is every layer whose input dimension does not divide by ``m``.
A ratio is ``sum over steps and layers of the FLOPs spent / (total_steps * dense FLOPs per
step)``; it does not depend on the batch size.

Method profiles
---------------
Densities per *sparse* layer and per step ``t`` (dense layers always count 1); ``d = N/M``;
``T = total_steps``; ``t_i, t_f, ΔT`` as in :mod:`bame_optim.core.schedule`.

``dense``: forward 1, input-grad 1, weight-grad 1. The baseline.

``static`` (random fixed N:M mask, the paper's Table 4 "Static"): forward, input-grad and
weight-grad at ``d`` on every step, the mask being drawn before the first forward.

``bame`` (this paper, Zhang et al. ICML 2025, with Jayakumar et al. 2020's three-phase
schedule), ``lma`` (BAME without OBF, Table 4) and ``rigl`` (RigL, Evci et al. 2020, inside
N:M blocks, Table 4) share one profile. Forward and input-grad run at the density of the mask
in force (the paper counts the input gradient sparse although ``Wᵀ`` is not N:M: see
``bame_bidir``); the weight gradient too (only kept weights get one), except on the update
steps of the evolve phase (``t_i < t < t_f``, ``t % ΔT == 0``), where LMA / RigL read the
gradient of every weight and the weight-grad counts 1. The mask in force is the one
:class:`~bame_optim.BAMESGD` left after the previous ``step()``: all ones at ``t = 0``, then in
the gradual phase the budget ``n(u) / M`` (:func:`~bame_optim.core.schedule.gradual_budget`) of the
last update step ``u < t``, and ``d`` once step ``t_i`` pruned to N:M. Gradual-phase updates and
the prune at ``t_i`` are by magnitude (or random if ``t_i = 0``) and need no gradient.

``srste`` (SR-STE, Zhou et al. ICLR 2021): forward ``d``; input-grad 1 and weight-grad 1 on
every step (the straight-through estimator updates every weight from the dense gradient).

``maxq`` (MaxQ, Xiang et al. CVPR 2024): input-grad 1 and weight-grad 1 on every step (the
straight-through estimator, as SR-STE); forward 1 at ``t = 0`` (the parameter as given), then
``d + (1 - d) p(t)``, with ``p(t)`` the share of blocks the incremental ramp keeps whole
(:func:`~bame_optim.peers.maxq.dense_block_schedule`, falling to 0 at ``t_i``, default
``T // 4``; ``sparsity_schedule`` picks the ramp, default ``linear``). ``MaxQSGD`` keeps
``floor(p(t) K)`` of a layer's ``K`` blocks whole, so the count is above what it runs by less
than one block per layer and step. The soft scales are an elementwise multiply: not counted.

``bimask`` (Bi-Mask, Zhang et al. NeurIPS 2023): forward ``d``; input-grad ``d`` through the
backward mask, N:M along the transposed weight; weight-grad 1 on every step.

``bame_bidir`` (the paper's BAME†, Table 2): as ``bame``, except that the input gradient of
every sparse layer whose output dimension divides by ``M`` uses
:class:`~bame_optim.peers.bidir.BidirBAMESGD`'s backward mask, which has N of every M along the
output dimension from the first ``step()`` on: input-grad ``d`` from ``t = 1`` (1 at ``t = 0``),
also during the gradual phase. Other sparse layers count as ``bame``.

``lbc`` (LBC, Zhang et al. NeurIPS 2022): input-grad and weight-grad 1 on every step (``t_i``
is not used); the forward runs the union of the candidate combinations still alive, counted
step by step as :class:`~bame_optim.peers.lbc.LBCSGD` runs it: at ``t = 0`` all ``C =
binom(M, N)`` combinations (density 1), at ``t >= 1`` the ``r = remaining_count(t - 1, C, t_f)``
left by the previous ``step()`` (:func:`~bame_optim.peers.lbc.remaining_count`: cubic from
``C`` to 1 over ``[0, t_f)``), so from ``t = t_f + 1`` on exactly N:M. Which ``r`` combinations
remain depends on the data, and so does the size of their union; ``r`` distinct N-subsets of a
block cover (:func:`lbc_union_bounds`)

* at most ``min(M, r N)`` entries (disjoint combinations): the ``lbc`` forward, per block and
  step, as the density a kernel must be ready to run (an upper bound of what ``LBCSGD`` runs);
* at least the smallest ``k`` with ``binom(k, N) >= r`` (all inside ``k`` entries): the
  ``lbc_lower`` profile (no optimizer of its own; a lower bound).

For ``N = 1`` the two agree (``r`` singletons cover ``r`` entries) and the count is exact.

``asp`` (NVIDIA ASP, Mishra et al. 2021, Table 1): ``pretrain_steps`` of dense training, then
``finetune_steps`` of fine-tuning with the mask pruned by magnitude before the first sparse
forward: forward, input-grad and weight-grad at ``d`` (the ratio the paper's Table 1 implies:
1.5x = 1 + 0.5 at 2:4; with ASP's masked dense kernels the fine-tuning backward would cost 1).
Both default to ``total_steps``; the ratio is still relative to a dense run of ``total_steps``.

Everything is summed in closed form over the schedule (``O(M - N)`` work, ``O((M - N) log
t_f)`` for LBC, not ``O(T)``), with exact rational arithmetic: :func:`flops_breakdown` returns
the exact ratio as a :class:`fractions.Fraction`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from typing import TypedDict

import torch
from torch import nn

from bame_optim.core.nm import check_nm
from bame_optim.core.schedule import DEFAULT_DELTA_T, resolve_schedule
from bame_optim.groups import is_attention, is_hf_conv1d, nm_param_groups
from bame_optim.peers.maxq import DEFAULT_SCHEDULE, dense_block_sum, resolve_ramp

__all__ = [
    "FlopsBreakdown",
    "FlopsProfile",
    "LayerFlops",
    "flops_breakdown",
    "layer_flops",
    "lbc_union_bounds",
    "step_density_sums",
    "training_flops_ratio",
]


class FlopsProfile(str, Enum):
    """The FLOPs profiles of the module docstring; each method of
    :data:`bame_optim.methods.METHODS` names one."""

    DENSE = "dense"
    FIXED = "fixed"  # static
    SCHEDULED = "scheduled"  # bame, lma, rigl
    SCHEDULED_BIDIR = "scheduled_bidir"  # bame_bidir
    STE = "ste"  # srste
    MAXQ = "maxq"  # STE with the incremental ramp's dense blocks in the forward
    BIMASK = "bimask"  # Bi-Mask (the paper's comparison; no optimizer here)
    LBC = "lbc"  # union of the remaining combinations at its largest (upper bound)
    LBC_LOWER = "lbc_lower"  # ... at its smallest (no optimizer of its own)
    PRETRAIN_FIXED = "pretrain_fixed"  # asp


def _profile(method: str | FlopsProfile) -> FlopsProfile:
    """The profile of a method of :data:`bame_optim.methods.METHODS`, or ``method`` itself."""
    if isinstance(method, FlopsProfile):
        return method
    from bame_optim.methods import METHODS  # the registry imports this module

    if method in METHODS:
        return METHODS[method].flops
    extra = (FlopsProfile.BIMASK, FlopsProfile.LBC_LOWER)  # profiles without an optimizer
    names = [*METHODS, *(profile.value for profile in extra)]
    for profile in extra:
        if method == profile.value:
            return profile
    raise ValueError(f"Invalid method value: {method!r} (one of {', '.join(names)})")


_PRODUCTS = ("forward", "input_grad", "weight_grad")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerFlops:
    """Dense FLOPs per sample of one layer's three training products (``2 * MACs`` each).

    ``sparse``: the optimizer trains this layer's weight N:M (as :func:`nm_param_groups` with
    ``pattern = (n, m)`` decides); ``pattern`` is ``None`` when no pattern was given.
    ``backward_mask``: a sparse layer whose output dimension divides by ``m``, so that
    :class:`~bame_optim.peers.bidir.BidirBAMESGD` gives it an N:M backward mask.
    """

    name: str
    kind: str
    forward: int
    input_grad: int
    weight_grad: int
    sparse: bool
    backward_mask: bool
    pattern: tuple[int, int] | None


class FlopsBreakdown(TypedDict):
    """What :func:`flops_breakdown` returns. FLOPs are per sample, summed over the run (times
    the batch size for absolute numbers); the ``*_ratio`` entries divide by ``dense_total``."""

    method: str
    steps: int
    dense_total: int
    forward: float
    input_grad: float
    weight_grad: float
    forward_ratio: float
    input_grad_ratio: float
    weight_grad_ratio: float
    sparse_share: float
    ratio: float
    ratio_exact: Fraction


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (an integer >= {minimum} is required)")
    return value


def _macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if not isinstance(module, (*_CONV, *_CONV_T)):  # Hugging Face Conv1D: x @ W, W [in, out]
        return output.numel() * module.weight.shape[0]
    conv: nn.modules.conv._ConvNd = module  # type: ignore[assignment]
    kernel = math.prod(conv.kernel_size)
    if isinstance(module, _CONV):
        return output.numel() * (conv.in_channels // conv.groups) * kernel
    return inputs[0].numel() * (conv.out_channels // conv.groups) * kernel


def _attention_macs(
    module: nn.MultiheadAttention, args: tuple[object, ...], kwargs: dict[str, object]
) -> list[tuple[nn.Module, str, str, nn.Parameter | None, int]]:
    """The products of one :class:`~torch.nn.MultiheadAttention` call, as ``(module, part,
    kind, weight, MACs)``: the input projection(s), the output projection and ``Q Kᵀ`` plus
    ``A V`` (no weight). Sizes come from the query and key shapes: ``[L, E]`` unbatched, else
    ``[L, B, E]``, or ``[B, L, E]`` when ``batch_first``."""
    given = dict(zip(("query", "key"), args, strict=False)) | kwargs
    query: torch.Tensor = given["query"]  # type: ignore[assignment]
    key: torch.Tensor = given["key"]  # type: ignore[assignment]
    token_dim = 1 if query.dim() == 3 and module.batch_first else 0
    batch = query.shape[1 - token_dim] if query.dim() == 3 else 1
    tgt, src = query.shape[token_dim], key.shape[token_dim]
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        parts = [(module, "in_proj", module.in_proj_weight, (tgt + 2 * src) * e * e)]
    else:
        parts = [
            (module, "q_proj", module.q_proj_weight, tgt * e * e),
            (module, "k_proj", module.k_proj_weight, src * e * module.kdim),
            (module, "v_proj", module.v_proj_weight, src * e * module.vdim),
        ]
    parts.append((module.out_proj, "", module.out_proj.weight, tgt * e * e))
    # keys after the projection: bias_k appends one, add_zero_attn another
    keys = src + (module.bias_k is not None) + module.add_zero_attn
    parts.append((module, "attention", None, 2 * tgt * keys * e))
    kinds = {"": type(module.out_proj).__name__, "attention": "attention"}
    return [
        (owner, part, kinds.get(part, type(module).__name__), weight, batch * count)
        for owner, part, weight, count in parts
    ]


def _innermost_attention(model: nn.Module) -> set[nn.Module]:
    """The attention modules of Hugging Face / timm models whose products ``Q Kᵀ`` and ``A V``
    no hook sees: the innermost :func:`~bame_optim.groups.is_attention` module below the model
    that is not, and holds no, ``nn.MultiheadAttention`` (BERT's ``BertSelfAttention``, not the
    ``BertAttention`` around it)."""
    return {
        m for m in model.modules()
        if m is not model and is_attention(m)
        and not any(is_attention(c) for c in m.modules() if c is not m)
        and not isinstance(m, nn.MultiheadAttention)
    }


def layer_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    n: int | None = None,
    m: int | None = None,
    exclude: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[LayerFlops]:
    """Per-layer dense training FLOPs per sample of ``model`` on inputs of ``input_shape``.

    Runs one forward on a batch-1 zero tensor of shape ``(1, *input_shape)`` (on the model's
    device, a ``meta`` model included, in eval mode and without gradients; every module's
    ``training`` flag is restored afterwards) and hooks every Linear, ConvNd,
    ConvTransposeNd and MultiheadAttention module that runs, in order of first call (an
    attention call gives ``<name>.in_proj``, its ``out_proj`` and ``<name>.attention``: see
    the module docstring).

    Args:
        model: the model.
        input_shape: one sample's shape, without the batch dimension (``(3, 32, 32)``).
        n, m: the N:M pattern; with both given, ``sparse`` marks the layers whose weight
            :func:`~bame_optim.nm_param_groups` ``(model, n, m, exclude)`` puts in the sparse
            group. With neither, every layer is dense.
        exclude: passed to :func:`~bame_optim.nm_param_groups`.
        dtype: of the input tensor (default: the model's first floating parameter's, else
            float32); give ``torch.long`` for token-id inputs.
    """
    if isinstance(input_shape, (str, bytes)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape
    ):
        raise ValueError(
            f"Invalid input_shape value: {input_shape!r} (positive integers, no batch dimension)"
        )
    if (n is None) != (m is None):
        raise ValueError(f"Invalid n value: {n!r} (give both n and m, or neither; m={m!r})")
    sparse_ids: dict[int, int] = {}  # id(weight) -> its input dimension (nm_dim)
    if n is not None and m is not None:
        check_nm(n, m)
        for group in nm_param_groups(model, n, m, exclude=exclude):
            if group["sparse"]:
                sparse_ids.update((id(p), group.get("nm_dim", 1)) for _, p in group["params"])

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if dtype is None:
        floating = [p.dtype for p in params if p.is_floating_point()]
        dtype = floating[0] if floating else torch.float32

    # (module, part) -> [name, kind, weight or None, MACs], in order of first call
    counts: dict[tuple[nn.Module, str], list] = {}
    names = {module: name for name, module in model.named_modules()}

    def add(module: nn.Module, part: str, kind: str, weight: torch.Tensor | None, n_macs: int):
        entry = counts.get((module, part))
        if entry is None:
            name = f"{names[module]}.{part}".strip(".")
            counts[module, part] = [name, kind, weight, n_macs]
        else:
            entry[3] += n_macs

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        add(module, "", type(module).__name__, module.weight, _macs(module, inputs, output))

    def attention_hook(
        module: nn.MultiheadAttention,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        output: object,
    ) -> None:
        for owner, part, kind, weight, n_macs in _attention_macs(module, args, kwargs):
            add(owner, part, kind, weight, n_macs)

    def self_attention_hook(
        module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
    ) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            batch, tokens, width = hidden.shape
            add(module, "attention", "attention", None, batch * 2 * tokens * tokens * width)

    innermost = _innermost_attention(model)
    handles = []
    for module in names:
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
        elif module in innermost:
            handles.append(module.register_forward_hook(self_attention_hook, with_kwargs=True))
        elif isinstance(module, (nn.Linear, *_CONV, *_CONV_T)) or is_hf_conv1d(module):
            handles.append(module.register_forward_hook(hook))
    modes = {module: module.training for module in names}
    # nn.TransformerEncoder(Layer)'s inference fast path skips its modules' forward (and hooks)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    layers = []
    for name, kind, weight, count in counts.values():
        flops = 2 * count
        sparse = weight is not None and id(weight) in sparse_ids
        layers.append(
            LayerFlops(
                name=name,
                kind=kind,
                forward=flops,
                input_grad=flops,
                weight_grad=flops,
                sparse=sparse,
                # the backward mask runs along the output dimension, the other one
                backward_mask=sparse and m is not None
                and weight.shape[1 - sparse_ids[id(weight)]] % m == 0,
                pattern=(n, m) if sparse and n is not None and m is not None else None,
            )
        )
    return layers


def step_density_sums(
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    backward_mask: bool = True,
    sparsity_schedule: str | None = None,
) -> tuple[Fraction, Fraction, Fraction]:
    """Exact sums over the ``total_steps`` steps of a sparse layer's forward, input-grad and
    weight-grad densities under ``method`` (profiles in the module docstring; ``asp`` gives
    its fine-tuning phase of ``total_steps`` steps). ``backward_mask``: whether the layer gets
    a backward mask under ``bame_bidir``; ``sparsity_schedule``: MaxQ's ramp (``maxq``
    only). ``O(M - N)`` work (MaxQ's ``cosine`` and ``exponential`` ramps: ``O(t_i)``, as a
    float sum).
    """
    profile = _profile(method)
    check_nm(n, m)
    steps = _check_int("total_steps", total_steps, 1)
    delta_t = _check_int("delta_t", delta_t, 1)
    if sparsity_schedule is not None and profile is not FlopsProfile.MAXQ:
        raise ValueError(f"Invalid sparsity_schedule value: {sparsity_schedule!r} (only method "
                         "'maxq' uses it)")
    if profile is FlopsProfile.MAXQ:  # its own t_i default; t_f is not used
        d = Fraction(n, m)
        ramp = dense_block_sum(steps, resolve_ramp(steps, t_i),
                               sparsity_schedule or DEFAULT_SCHEDULE)
        return 1 + d * (steps - 1) + (1 - d) * ramp, Fraction(steps), Fraction(steps)
    t_i, t_f = resolve_schedule(steps, t_i, t_f)
    d = Fraction(n, m)
    if profile is FlopsProfile.DENSE:
        return Fraction(steps), Fraction(steps), Fraction(steps)
    if profile in (FlopsProfile.FIXED, FlopsProfile.PRETRAIN_FIXED):
        return d * steps, d * steps, d * steps
    if profile is FlopsProfile.STE:
        return d * steps, Fraction(steps), Fraction(steps)
    if profile is FlopsProfile.BIMASK:
        return d * steps, d * steps, Fraction(steps)
    if profile in (FlopsProfile.LBC, FlopsProfile.LBC_LOWER):
        forward = _lbc_forward_entries(n, m, steps, t_f, upper=profile is FlopsProfile.LBC)
        return Fraction(forward, m), Fraction(steps), Fraction(steps)

    # BAME-like. Kept per block in the forward of step t: m at t = 0; for t >= 1 the budget
    # after step s = t - 1: gradual_budget(u) with u = delta_t * (s // delta_t) while s < t_i,
    # n from s = t_i on. Summed over s in [0, steps - 1): n per step, plus for j = 1..m-n one
    # extra per step s < S whose u satisfies ceil((m - n)(t_i - u) / t_i) >= j, i.e.
    # u < t_i (m - n - j + 1) / (m - n), i.e. s < delta_t * ceil(that / delta_t).
    span = min(t_i, steps - 1)
    kept = m + n * (steps - 1)
    for k in range(1, m - n + 1):
        reach = delta_t * -(-t_i * k // ((m - n) * delta_t))
        kept += min(span, reach)
    forward = Fraction(kept, m)
    # evolve-phase update steps t_i < t < t_f with t % delta_t == 0: dense weight gradient
    evolve_updates = max(0, (t_f - 1) // delta_t - t_i // delta_t) if t_f else 0
    weight_grad = forward + evolve_updates * (1 - d)
    input_grad = forward
    if profile is FlopsProfile.SCHEDULED_BIDIR and backward_mask:
        input_grad = 1 + d * (steps - 1)
    return forward, input_grad, weight_grad


def lbc_union_bounds(r: int, n: int, m: int) -> tuple[int, int]:
    """``(least, most)`` entries of a block of ``m`` that the union of ``r`` distinct
    ``n``-subsets can cover (``1 <= r <= binom(m, n)``): the smallest ``k`` with
    ``binom(k, n) >= r`` (all of them inside ``k`` entries) and ``min(m, r n)`` (as disjoint as
    they can be). The forward density of LBC with ``r`` combinations left lies in between.
    """
    check_nm(n, m)
    _check_int("r", r, 1)
    if r > math.comb(m, n):
        raise ValueError(f"Invalid r value: {r!r} (at most binom({m}, {n}) = {math.comb(m, n)})")
    least = n
    while math.comb(least, n) < r:
        least += 1
    return least, min(m, r * n)


def _lbc_forward_entries(n: int, m: int, steps: int, t_f: int, upper: bool) -> int:
    """``sum over t < steps`` of the entries per block of LBC's forward (``m`` at ``t = 0``,
    then a bound of the union of ``r(t - 1)`` combinations; module docstring), in closed form.

    The bound ``U(r)`` is non-decreasing in ``r``, so ``U(r) = U(1) + sum_j [r >= j] (U(j) -
    U(j - 1))`` over the ``j`` where it steps up. ``r(s) >= j >= 2`` holds iff ``s < t_f`` and
    ``(C - 1)(t_f - s)^3 >= (j - 1) t_f^3``, i.e. for ``s`` in ``[0, t_f - x_j]`` with ``x_j``
    the least positive integer meeting it: ``O((M - N) log t_f)`` work.
    """
    c = math.comb(m, n)
    if upper:  # min(m, j n) steps up at j = 2 .. ceil(m / n)
        steps_up = [(j, min(m, j * n) - (j - 1) * n) for j in range(2, min(c, -(-m // n)) + 1)]
    else:  # the least k with binom(k, n) >= j steps up by one at j = binom(k, n) + 1
        steps_up = [(math.comb(k, n) + 1, 1) for k in range(n, m)]
    later = steps - 1  # the steps t >= 1, whose forward follows step() s = t - 1
    entries = m + n * later
    for j, rise in steps_up:
        if not t_f:
            break
        low, high = 1, t_f  # x_j: (c - 1) x^3 >= (j - 1) t_f^3 holds at x = t_f since j <= c
        while low < high:
            mid = (low + high) // 2
            if (c - 1) * mid**3 >= (j - 1) * t_f**3:
                high = mid
            else:
                low = mid + 1
        entries += rise * min(later, t_f - low + 1)
    return entries


def flops_breakdown(
    layers: Sequence[LayerFlops],
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    sparsity_schedule: str | None = None,
) -> FlopsBreakdown:
    """Training FLOPs of ``method`` on ``layers`` (from :func:`layer_flops` with the same
    ``n, m``), per product, and their ratio to ``total_steps`` of dense training.

    ``pretrain_steps`` and ``finetune_steps`` (default ``total_steps`` each) are for ``asp``
    only, ``sparsity_schedule`` for ``maxq`` only; any other method raises ``ValueError`` if
    they are given.
    """
    profile = _profile(method)
    check_nm(n, m)
    total_steps = _check_int("total_steps", total_steps, 1)
    for layer in layers:
        if layer.sparse and layer.pattern != (n, m):
            raise ValueError(
                f"Invalid layers value: layer {layer.name!r} was marked sparse for pattern "
                f"{layer.pattern}, not n:m = {n}:{m} (call layer_flops with the same n, m)"
            )
    extra = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    if profile is FlopsProfile.PRETRAIN_FIXED:
        pretrain = total_steps if pretrain_steps is None else pretrain_steps
        finetune = total_steps if finetune_steps is None else finetune_steps
        pretrain = _check_int("pretrain_steps", pretrain, 0)
        finetune = _check_int("finetune_steps", finetune, 1)
    else:
        for name, value in extra.items():
            if value is not None:
                raise ValueError(f"Invalid {name} value: {value!r} (only method 'asp' uses it)")
        pretrain, finetune = 0, total_steps

    sums = {
        has_mask: step_density_sums(
            method,
            n=n,
            m=m,
            total_steps=finetune,
            t_i=t_i if profile is not FlopsProfile.PRETRAIN_FIXED else None,
            t_f=t_f if profile is not FlopsProfile.PRETRAIN_FIXED else None,
            delta_t=delta_t,
            backward_mask=has_mask,
            sparsity_schedule=sparsity_schedule,
        )
        for has_mask in (False, True)
    }
    totals = dict.fromkeys(_PRODUCTS, Fraction(0))
    dense_step = 0
    sparse_step = 0
    for layer in layers:
        dense = (layer.forward, layer.input_grad, layer.weight_grad)
        dense_step += sum(dense)
        densities = (
            sums[layer.backward_mask] if layer.sparse else (Fraction(finetune),) * len(_PRODUCTS)
        )
        if layer.sparse:
            sparse_step += sum(dense)
        for product, flops, density in zip(_PRODUCTS, dense, densities, strict=True):
            totals[product] += flops * (density + pretrain)
    if not dense_step:
        raise ValueError("Invalid layers value: [] (no Linear or ConvNd layer to count)")
    dense_total = dense_step * total_steps
    exact = sum(totals.values(), Fraction(0)) / dense_total
    return FlopsBreakdown(
        method=method,
        steps=pretrain + finetune,
        dense_total=dense_total,
        forward=float(totals["forward"]),
        input_grad=float(totals["input_grad"]),
        weight_grad=float(totals["weight_grad"]),
        forward_ratio=float(totals["forward"] / dense_total),
        input_grad_ratio=float(totals["input_grad"] / dense_total),
        weight_grad_ratio=float(totals["weight_grad"] / dense_total),
        sparse_share=sparse_step / dense_step,
        ratio=float(exact),
        ratio_exact=exact,
    )


def training_flops_ratio(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    exclude: Sequence[str] | str | None = None,
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    sparsity_schedule: str | None = None,
) -> float:
    """Training FLOPs of ``method`` relative to ``total_steps`` steps of dense training.

    ``model`` and ``input_shape`` (one sample, no batch dimension) give the layers
    (:func:`layer_flops`); ``n, m, exclude`` choose the sparse ones exactly as
    :func:`~bame_optim.nm_param_groups` does; ``t_i, t_f`` default to ``T // 3`` and
    ``2T // 3`` (``maxq``: ``t_i`` defaults to ``T // 4``); ``pretrain_steps`` /
    ``finetune_steps`` are ASP's phases (default ``total_steps`` each), ``sparsity_schedule``
    MaxQ's ramp. Method profiles: module docstring. Raises ``ValueError`` naming the
    argument for an unknown method, an invalid pattern or schedule.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    >>> training_flops_ratio(net, (16,), "srste", n=1, m=4, total_steps=10, exclude=())
    0.75
    """
    _profile(method)
    check_nm(n, m)
    layers = layer_flops(model, input_shape, n=n, m=m, exclude=exclude)
    return flops_breakdown(
        layers,
        method,
        n=n,
        m=m,
        total_steps=total_steps,
        t_i=t_i,
        t_f=t_f,
        delta_t=delta_t,
        pretrain_steps=pretrain_steps,
        finetune_steps=finetune_steps,
        sparsity_schedule=sparsity_schedule,
    )["ratio"]
