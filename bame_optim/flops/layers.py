"""Per-layer dense training FLOPs of a model, counted by forward hooks: Linear, ConvNd,
ConvTransposeNd, Hugging Face ``Conv1D``, ``nn.MultiheadAttention`` (projections and
``Q Kᵀ``, ``A V``) and the attention products of Hugging Face / timm attention modules.
What is counted and why: docs/flops.md, "What is counted"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bame_optim.core.nm import check_nm
from bame_optim.groups import is_attention, is_hf_conv1d, nm_param_groups

__all__ = ["LayerFlops", "layer_flops"]

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
    docs/flops.md).

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


