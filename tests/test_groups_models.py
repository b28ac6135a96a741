"""nm_param_groups on the model families people train N:M: which weights are sparse, on which
axis, and that training them with BAMEAdamW ends exactly N:M along each input dimension."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bame_optim import BAMEAdamW, nm_param_groups
from bame_optim.core.nm import is_nm_sparse

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

LAYERS = 2


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=LAYERS,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16)
    return transformers.BertModel(config)


def _blocks(prefix: str, suffixes: tuple[str, ...]) -> set[str]:
    return {f"{prefix}{i}.{s}" for i in range(LAYERS) for s in suffixes}


# model -> (sparse weights, dense weights with ndim >= 2, nm_dim of the sparse weights)
FAMILIES = {
    "gpt2": (
        _gpt2,
        _blocks("transformer.h.", ("attn.c_attn.weight", "attn.c_proj.weight",
                                   "mlp.c_fc.weight", "mlp.c_proj.weight")),
        # lm_head.weight is wte.weight (tied): one tensor, listed once, dense
        {"transformer.wte.weight", "transformer.wpe.weight"},
        0,
    ),
    "llama": (
        _llama,
        _blocks("model.layers.", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")),
        {"model.embed_tokens.weight", "lm_head.weight"},
        1,
    ),
    "bert": (
        _bert,
        _blocks("encoder.layer.", ("attention.self.query.weight", "attention.self.key.weight",
                                   "attention.self.value.weight",
                                   "attention.output.dense.weight", "intermediate.dense.weight",
                                   "output.dense.weight")),
        {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
         "embeddings.token_type_embeddings.weight", "pooler.dense.weight"},
        1,
    ),
    "timm_deit": (
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=LAYERS,
                                  img_size=32, num_classes=10),
        _blocks("blocks.", ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight",
                            "mlp.fc2.weight")),
        {"patch_embed.proj.weight", "head.weight", "pos_embed", "cls_token"},
        1,
    ),
    "torchvision_vit": (
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=LAYERS, num_heads=2, hidden_dim=32,
            mlp_dim=64, num_classes=10),
        _blocks("encoder.layers.encoder_layer_", ("self_attention.in_proj_weight",
                                                  "self_attention.out_proj.weight",
                                                  "mlp.0.weight", "mlp.3.weight")),
        {"conv_proj.weight", "heads.head.weight", "class_token", "encoder.pos_embedding"},
        1,
    ),
    "torchvision_resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        {f"layer{i}.{j}.conv{k}.weight" for i in range(1, 5) for j in range(2) for k in (1, 2)}
        | {f"layer{i}.0.downsample.0.weight" for i in range(2, 5)},
        {"conv1.weight", "fc.weight"},
        1,
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        # pointwise convolutions; the stem, the depthwise ones and the classifier stay dense
        {"features.1.conv.1.weight", "features.18.0.weight"}
        | {f"features.{i}.conv.{j}.weight" for i in range(2, 18) for j in ("0.0", "2")},
        {"features.0.0.weight", "features.1.conv.0.0.weight", "classifier.1.weight"}
        | {f"features.{i}.conv.1.0.weight" for i in range(2, 18)},
        1,
    ),
}


def _split(groups: list[dict]) -> tuple[set[str], set[str], set[int]]:
    sparse, dense, dims = set(), set(), set()
    for group in groups:
        for name, p in group["params"]:
            if group["sparse"]:
                sparse.add(name)
                dims.add(group.get("nm_dim", 1))
            elif p.ndim >= 2:
                dense.add(name)
    return sparse, dense, dims


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_has_the_expected_sparse_and_dense_weights(family):
    build, sparse, dense, nm_dim = FAMILIES[family]
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no family needs a warning
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    got_sparse, got_dense, dims = _split(groups)
    assert got_sparse == sparse
    assert got_dense == dense
    assert dims == {nm_dim}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named), "every parameter, once"


def test_the_first_attention_projection_is_not_taken_for_a_stem():
    # The old rule kept layer 0's q_proj (Llama) and query (BERT) dense as a "stem".
    for build, name in ((_llama, "model.layers.0.self_attn.q_proj.weight"),
                        (_bert, "encoder.layer.0.attention.self.query.weight")):
        sparse, _, _ = _split(nm_param_groups(build(), 2, 4))
        assert name in sparse


def test_a_weight_tied_to_an_embedding_stays_dense_even_unexcluded():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    sparse, _, _ = _split(nm_param_groups(model, 2, 4, exclude=()))
    assert "transformer.wte.weight" not in sparse and "lm_head.weight" not in sparse


def _lm_batch(model: nn.Module, vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_transformers_train_to_exact_n_m_along_the_input_dimension(family):
    torch.manual_seed(0)
    build, sparse_names, _, nm_dim = FAMILIES[family]
    model = build()
    embeddings = {name: p.detach().clone() for name, p in model.named_parameters()
                  if p.ndim == 2 and any(k in name for k in ("embed", "wte", "wpe"))}
    assert len(embeddings) >= 1
    opt = BAMEAdamW(nm_param_groups(model, 2, 4, weight_decay=0.01), lr=1e-2, total_steps=12,
                    delta_t=1)
    batch = _lm_batch(model)
    for _ in range(7):  # stops inside the evolve phase
        opt.zero_grad()
        out = model(**batch) if family != "bert" else model(input_ids=batch["input_ids"])
        loss = out.loss if family != "bert" else out.last_hidden_state.square().mean()
        loss.backward()
        opt.step()
    opt.finalize_masks()
    assert sorted(opt.check_nm()) == sorted(sparse_names)
    named = dict(model.named_parameters())
    for name in sparse_names:
        weight = named[name].detach()
        along_input = weight.t() if nm_dim == 0 else weight
        assert is_nm_sparse(along_input, 2, 4), name
        assert (along_input.reshape(-1, 4) != 0).sum(1).eq(2).all(), name  # not fewer: N:M
    for name, before in embeddings.items():
        after = named[name].detach()
        assert not torch.equal(after, before), f"{name} trains"
        assert torch.equal(after != 0, before != 0), f"{name} stays dense"
    rows = {r["name"]: r for r in opt.sparsity_report()}
    assert all(rows[name]["nm_valid"] and rows[name]["nm_dim"] == nm_dim for name in sparse_names)


def test_gpt2_flops_count_the_conv1d_projections_as_sparse():
    from bame_optim.flops import layer_flops

    model = _gpt2()
    layers = {layer.name: layer for layer in layer_flops(model, (12,), n=2, m=4,
                                                         dtype=torch.long)}
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert c_attn.sparse and c_attn.pattern == (2, 4)
    assert c_attn.forward == 2 * 12 * 32 * 96  # tokens x in x out, 2 FLOPs per MAC
    assert not layers["lm_head"].sparse


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "timm_deit"])
def test_flops_count_the_attention_products_of_hf_and_timm_models_once_per_layer(family):
    from bame_optim.flops import layer_flops

    model = FAMILIES[family][0]()
    shape, dtype = ((12,), torch.long) if family != "timm_deit" else ((3, 32, 32), None)
    attention = [layer for layer in layer_flops(model, shape, dtype=dtype)
                 if layer.kind == "attention"]
    tokens = 12 if family != "timm_deit" else 4 + 1  # 2x2 patches of 16 and the class token
    width = 32 if family != "timm_deit" else 192  # DeiT-Ti
    assert len(attention) == LAYERS
    assert all(layer.forward == 2 * 2 * tokens * tokens * width and not layer.sparse
               for layer in attention)
