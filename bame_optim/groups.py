"""Which parameters of a model are N:M sparse, and which are decayed: :func:`nm_param_groups`."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase
from numbers import Real
from typing import Any

from torch import nn

from bame_optim.core.nm import check_nm

__all__ = [
    "SPARSE_LAYER_TYPES",
    "TIMM_OPTIONAL_TOKENS",
    "TORCHVISION_VIT_NO_DECAY",
    "default_exclude",
    "is_attention",
    "is_hf_conv1d",
    "nm_param_groups",
]

SPARSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` is made N:M sparse: their dimension 1 is the input dimension
(transposed convolutions put output channels there, so they stay dense)."""

TIMM_OPTIONAL_TOKENS: frozenset[str] = frozenset(
    {"pos_embed", "cls_token", "reg_token", "dist_token"}
)
"""Names timm's ViT-family ``no_weight_decay()`` returns whatever the configuration (timm's
``VisionTransformer`` always lists ``reg_token`` and ``dist_token``); on a timm module they may
match no parameter without a warning."""

TORCHVISION_VIT_NO_DECAY: tuple[str, ...] = ("class_token", "encoder.pos_embedding")
"""The class token and position embedding of ``torchvision.models.VisionTransformer``, which
defines no ``no_weight_decay()``."""


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's projections: ``x @ W`` with
    ``W [in, out]``). Checked without importing ``transformers``: a model holding one has
    imported it."""
    found = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(found, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module: :class:`torch.nn.MultiheadAttention`, or one
    of Hugging Face (``GPT2Attention``, ``LlamaAttention``, ``BertSelfAttention``, ...) or timm
    (``Attention``), which are named so by convention (no common base class)."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention")


def _stem(model: nn.Module) -> str | None:
    """The name of the layer that reads the model's input, when it is a layer the peers keep
    dense: the first Linear / Conv layer in module order (a convolutional stem, a patch
    embedding, the input layer of an MLP), unless an ``nn.Embedding`` or an attention module
    comes first. A token model's input layer is its embedding (dense anyway), and a layer that
    follows an attention module is a transformer block's projection, never a stem."""
    for name, module in model.named_modules():
        if name and (isinstance(module, nn.Embedding) or is_attention(module)):
            return None
        if isinstance(module, SPARSE_LAYER_TYPES):
            return name
    return None


def _head(model: nn.Module) -> str | None:
    """The name of the classifier or LM head: the last ``nn.Linear`` in module order, unless it
    sits inside an ``nn.ModuleList`` (a stack of repeated blocks: a headless backbone such as
    ``LlamaModel`` ends with its last block's projection, not a head)."""
    in_stack: set[str] = set()
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            in_stack.add(f"{name}.")
        if isinstance(module, nn.Linear):
            last = name
    if last is None or any(last.startswith(prefix) for prefix in in_stack):
        return None
    return last


def default_exclude(model: nn.Module) -> list[str]:
    """Names of the layers the peers keep dense: the stem (:func:`_stem`: a convolutional stem
    or patch embedding, never a transformer's first attention projection) and the classifier
    or LM head (:func:`_head`). Embeddings are never sparse, and weights tied to one (an LM
    head sharing the token embedding) stay dense whatever ``exclude`` says."""
    names = [name for name in (_stem(model), _head(model)) if name is not None]
    return list(dict.fromkeys(names))


def _candidate_weights(module: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
    """The weights of ``module`` that may be N:M sparse, as ``(attribute name, parameter,
    nm_dim)``: ``nm_dim`` is the input dimension, along which the blocks run.

    * Linear / ConvNd (``[out, in, ...]``): ``weight``, dimension 1.
    * Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``; ``[in, out]``, it
      computes ``x @ W``): ``weight``, dimension 0.
    * :class:`torch.nn.MultiheadAttention`: the packed ``in_proj_weight`` ``[3E, E]`` when
      ``_qkv_same_embed_dim`` (the Q, K and V projections stacked along the output dimension,
      so every row is one projection's row over the ``E`` inputs, exactly a Linear weight),
      else the separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``; dimension
      1. Its ``out_proj`` is an ``nn.Linear`` and is handled as one.
    """
    if isinstance(module, SPARSE_LAYER_TYPES):
        return [("weight", module.weight, 1)]
    if is_hf_conv1d(module):
        return [("weight", module.weight, 0)]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            names = ("in_proj_weight",)
        else:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        found = [(name, getattr(module, name, None)) for name in names]
        return [(name, p, 1) for name, p in found if isinstance(p, nn.Parameter)]
    return []


def _is_switched_off(module: nn.Module, dotted: str) -> bool:
    """Whether ``dotted`` names a buffer of ``module`` or an attribute set to ``None`` (an
    optional token or embedding this configuration of the model does not have)."""
    owner: Any = module
    *path, leaf = dotted.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if not isinstance(owner, nn.Module):
            return False
    if leaf in owner._buffers:
        return True
    return hasattr(owner, leaf) and getattr(owner, leaf) is None


def _declared_no_decay(model: nn.Module) -> tuple[set[str], list[str]]:
    """Full names of the parameters that ``model`` declares should not be weight-decayed, and
    the declared names that match no parameter.

    * Every module (the model or a submodule, e.g. a timm backbone inside a wrapper) with a
      callable ``no_weight_decay()`` (timm's convention, also in DeiT's code): it returns
      names or ``fnmatch`` patterns (``"*.relative_position_bias_table"``) relative to that
      module, matched against its full parameter names as timm does.
    * Every ``torchvision.models.VisionTransformer``: its ``class_token`` and
      ``encoder.pos_embedding`` (:data:`TORCHVISION_VIT_NO_DECAY`).

    A declared name that matches no parameter is returned in the second list (to be named in a
    warning), except buffers, attributes set to ``None`` (switched-off tokens) and, on a timm
    module, :data:`TIMM_OPTIONAL_TOKENS`, which timm lists whether or not the model has them.

    Raises:
        TypeError: a ``no_weight_decay()`` returned something other than names.
    """
    names: set[str] = set()
    unmatched: list[str] = []
    vit_module = sys.modules.get("torchvision.models.vision_transformer")
    torchvision_vit = getattr(vit_module, "VisionTransformer", None)
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        local = [name for name, _ in module.named_parameters()]
        if torchvision_vit is not None and isinstance(module, torchvision_vit):
            names.update(dot + name for name in TORCHVISION_VIT_NO_DECAY if name in local)
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        declared = declare()
        declared = [declared] if isinstance(declared, str) else declared
        where = f"{type(module).__name__} {prefix!r}" if prefix else type(module).__name__
        if declared is None:
            declared = ()
        if not isinstance(declared, Iterable) or not all(isinstance(p, str) for p in declared):
            raise TypeError(
                f"no_weight_decay() of {where} returned {declared!r}: "
                "an iterable of parameter names is required"
            )
        is_timm = type(module).__module__.startswith("timm.")
        for pattern in sorted(set(declared)):
            matched = [name for name in local if fnmatchcase(name, pattern)]
            names.update(dot + name for name in matched)
            if matched or _is_switched_off(module, pattern):
                continue
            if not (is_timm and pattern in TIMM_OPTIONAL_TOKENS):
                unmatched.append(f"{pattern!r} (no_weight_decay() of {where})")
    return names, unmatched


def _check_weight_decay(weight_decay: float) -> None:
    """Raise ``ValueError`` unless ``weight_decay`` is a finite real ``>= 0``."""
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, Real)
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay!r} (a finite number >= 0 is required)"
        )


def _sparse_weights(model: nn.Module, m: int, patterns: list[str]) -> dict[int, tuple[str, int]]:
    """``id(weight) -> (name, nm_dim)`` of the weights made N:M sparse (see
    :func:`nm_param_groups`). One ``UserWarning`` names those left dense because their input
    dimension is not divisible by ``m``; another says why when no weight is sparse at all."""
    tied = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    sparse_weights: dict[int, tuple[str, int]] = {}
    indivisible: list[str] = []
    eligible = excluded = tied_found = 0
    for name, module in model.named_modules():
        candidates = _candidate_weights(module)
        if not candidates:
            continue
        eligible += len(candidates)
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            excluded += len(candidates)
            continue
        for attribute, weight, nm_dim in candidates:
            full_name = f"{name}.{attribute}" if name else attribute
            inputs = weight.shape[nm_dim] if weight.ndim >= 2 else 1
            if id(weight) in tied:  # an LM head sharing the token embedding
                tied_found += 1
                continue
            if inputs == 1:
                continue  # depthwise: one input per group, never N:M
            if inputs % m:
                indivisible.append(
                    f"{full_name} of shape {tuple(weight.shape)} stays dense "
                    f"(input dimension {inputs})"
                )
                continue
            sparse_weights[id(weight)] = (full_name, nm_dim)
    if indivisible:
        warnings.warn(
            f"nm_param_groups: {len(indivisible)} weight(s) whose input dimension is not "
            f"divisible by m={m}: " + "; ".join(indivisible),
            UserWarning,
            stacklevel=3,
        )
    if not sparse_weights:
        if not eligible:
            why = ("the model has no Linear, Conv1d/2d/3d, MultiheadAttention or Hugging Face "
                   "Conv1D layer")
        elif excluded == eligible:
            why = (f"every eligible layer is excluded ({', '.join(patterns)}; exclude=() makes "
                   "every eligible layer sparse)")
        else:
            why = (f"of {eligible} eligible weight(s), {excluded} are excluded, {tied_found} "
                   f"tied to an embedding and {len(indivisible)} have an input dimension that "
                   f"m={m} does not divide")
        warnings.warn(
            f"nm_param_groups: no weight is N:M sparse, every group is dense: {why}",
            UserWarning,
            stacklevel=3,
        )
    return sparse_weights


def nm_param_groups(
    model: nn.Module,
    n: int,
    m: int,
    exclude: Iterable[str] | str | None = None,
    no_decay_1d: bool = True,
    *,
    weight_decay: float | None = None,
    no_weight_decay: Iterable[str] | str = (),
) -> list[dict[str, Any]]:
    """Param groups for :class:`bame_optim.BAMESGD` (or any ``torch.optim`` optimizer, e.g.
    ``AdamW``) with the peers' choice of sparse layers and, on request, of decayed ones.

    **Sparse or dense.** Linear and Conv1d/2d/3d weights, the input projections of
    :class:`torch.nn.MultiheadAttention` (``in_proj_weight``, ``[3E, E]``) and Hugging Face
    ``Conv1D`` weights (GPT-2; ``[in, out]``, N:M along dimension 0, in groups with
    ``"nm_dim": 0``; see :func:`_candidate_weights`) are N:M sparse along their input
    dimension, except the excluded layers (by default the stem and the classifier or LM
    head, :func:`default_exclude`). Everything else is dense: biases and norm parameters,
    embeddings and the weights tied to them (GPT-2's ``lm_head`` is ``wte``), excluded layers,
    and weights whose input dimension does not divide by ``m``. Weights whose input dimension
    is 1 (depthwise convolutions such as MobileNet-V2's, where a block could hold only one
    weight) are left dense silently, as no ``m`` could ever apply to them; every other weight
    whose input dimension does not divide by ``m`` is named, all together in **one**
    ``UserWarning``. When no weight ends up sparse, a ``UserWarning`` says why (no eligible
    layer, all excluded, ``m`` divides none). Weight decay never changes which parameters are
    sparse.

    **Weight decay.** A parameter gets ``weight_decay=0.0`` when any of these holds:

    * ``no_decay_1d`` and ``param.ndim <= 1`` (biases, norm weights);
    * its full name matches a pattern of ``no_weight_decay`` (always applied);
    * only when ``weight_decay`` is given: the model declares it (:func:`_declared_no_decay`:
      the ``no_weight_decay()`` method of the model or a submodule, as in timm and DeiT, and
      torchvision ViT's ``class_token`` and ``encoder.pos_embedding``).

    Every other group carries ``weight_decay=weight_decay`` when it is given, and no
    ``weight_decay`` key (the optimizer's default) when it is ``None``, the default, which
    gives the groups this function always gave (the 1-D rule only), so existing callers are
    unaffected.

    .. note::
        DeiT (Touvron et al. 2021) trains with AdamW, weight decay 0.05, and, through timm's
        ``create_optimizer`` (``param_groups_weight_decay``), no decay on 1-D parameters and on
        the names of ``model.no_weight_decay()`` (``pos_embed``, ``cls_token``,
        ``dist_token``). ``nm_param_groups(model, n, m, weight_decay=0.05)`` reproduces that
        split for timm and torchvision ViTs, with the sparse weights in their own groups.

    Args:
        model: the model.
        n, m: the N:M pattern of the sparse group.
        exclude: module names (``fnmatch`` patterns such as ``"head.*"``) to keep dense.
            ``None`` keeps the stem and the classifier or LM head dense
            (:func:`default_exclude`);
            ``()`` makes every eligible layer sparse. A pattern that matches no module raises
            ``ValueError``, so typos do not pass silently.
        no_decay_1d: put parameters with ``ndim <= 1`` in a group with ``weight_decay=0``.
        weight_decay: the decay of every decayed group (a finite number ``>= 0``); given, it
            also turns on the model's own no-decay names. ``None``: no split by name.
        no_weight_decay: further full parameter names (``fnmatch`` patterns) without decay. A
            pattern that matches no parameter raises ``ValueError``; a name the *model*
            declares that matches none only warns (see :func:`_declared_no_decay`).

    Returns:
        Up to six groups (empty ones left out, in this order), each holding
        ``(name, parameter)`` pairs so that the optimizer records ``param_names``:
        ``{"sparse": True, "n": n, "m": m}``, the same with ``"weight_decay": 0.0``, the same
        two with ``"nm_dim": 0`` (``[in, out]`` weights), ``{"sparse": False}`` and
        ``{"sparse": False, "weight_decay": 0.0}``; the decayed ones also carry
        ``"weight_decay": weight_decay`` when it is given.

    Raises:
        ValueError: invalid ``n, m`` or ``weight_decay``, or an ``exclude`` / ``no_weight_decay``
            pattern that matches nothing.
        TypeError: a ``no_weight_decay()`` of the model returned something other than names.
    """
    check_nm(n, m)
    if weight_decay is not None:
        _check_weight_decay(weight_decay)
    if exclude is None:
        patterns = default_exclude(model)
    else:
        patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    module_names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in module_names):
            raise ValueError(f"Invalid exclude value: {pattern!r} matches no module of the model")
    named = list(model.named_parameters())
    extra = [no_weight_decay] if isinstance(no_weight_decay, str) else list(no_weight_decay)
    for pattern in extra:
        if not any(fnmatchcase(name, pattern) for name, _ in named):
            raise ValueError(
                f"Invalid no_weight_decay value: {pattern!r} matches no parameter of the model"
            )
    declared: set[str] = set()
    if weight_decay is not None:
        declared, unmatched = _declared_no_decay(model)
        if unmatched:
            warnings.warn(
                f"nm_param_groups: {len(unmatched)} no_weight_decay name(s) match no parameter "
                "and are ignored: " + "; ".join(unmatched),
                UserWarning,
                stacklevel=2,
            )

    sparse_weights = _sparse_weights(model, m, patterns)
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    no = {"weight_decay": 0.0}
    # (sparse, nm_dim, decayed) -> group; the order below is the order of the groups.
    groups = {
        (True, 1, True): {"sparse": True, "n": n, "m": m, **decay},
        (True, 1, False): {"sparse": True, "n": n, "m": m, **no},
        (True, 0, True): {"sparse": True, "n": n, "m": m, "nm_dim": 0, **decay},
        (True, 0, False): {"sparse": True, "n": n, "m": m, "nm_dim": 0, **no},
        (False, 1, True): {"sparse": False, **decay},
        (False, 1, False): {"sparse": False, **no},
    }
    members: dict[tuple[bool, int, bool], list[tuple[str, nn.Parameter]]] = {k: [] for k in groups}
    for name, param in named:
        skip_decay = (
            (no_decay_1d and param.ndim <= 1)
            or name in declared
            or any(fnmatchcase(name, pattern) for pattern in extra)
        )
        found = sparse_weights.get(id(param))
        key = (True, found[1], not skip_decay) if found else (False, 1, not skip_decay)
        members[key].append((name, param))
    return [{"params": members[key], **group} for key, group in groups.items() if members[key]]
