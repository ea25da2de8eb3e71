"""binarize() on every supported architecture, built from tiny random configs."""
import pytest
import torch
from torch import nn

from binarymos import BinaryMoSConfig, BinaryMoSLinear, SignLinear, UnsupportedModelError, binarize
from binarymos.convert import decoder_blocks
from conftest import tiny_model


def linears_in_blocks(model):
    """Names (relative to the model) of every Linear / GPT-2 Conv1D inside the decoder blocks."""
    blocks_name, _ = decoder_blocks(model)
    return {name for name, m in model.named_modules()
            if name.startswith(blocks_name + ".") and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}


def test_every_decoder_linear_is_replaced_and_nothing_else(arch):
    model = tiny_model(arch)
    targets = linears_in_blocks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    outside = {name: type(m) for name, m in model.named_modules() if name and name not in targets}
    binarize(model, BinaryMoSConfig(num_experts=2))
    modules = dict(model.named_modules())
    assert targets and all(isinstance(modules[name], BinaryMoSLinear) for name in targets)
    assert {name for name, m in modules.items() if isinstance(m, BinaryMoSLinear)} == targets
    for name, kind in outside.items():  # embeddings, norms, LM head, attention modules: untouched
        assert type(modules[name]) is kind, name
    for name, p in model.named_parameters():
        if not any(name.startswith(t + ".") for t in targets):
            assert torch.equal(p, before[name]), name
    ids = torch.randint(0, 100, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(modules[t].weight.grad is not None for t in targets)


def test_gpt2_conv1d_is_transposed_into_the_latent_weight():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()  # (in, out)
    binarize(model, BinaryMoSConfig(num_experts=1))
    layer = model.transformer.h[0].attn.c_attn
    assert torch.equal(layer.weight, weight.T) and torch.equal(layer.bias, bias)
    x = torch.randn(3, weight.shape[0])
    signs = torch.where(weight >= 0, 1.0, -1.0).T
    ref = ((x * layer.scale_in[0]) @ signs.T) * layer.scale_out[0] + bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_sign_method_and_modules_to_not_convert():
    model = tiny_model("llama")
    keep = model.model.layers[1].mlp.down_proj
    binarize(model, BinaryMoSConfig(method="sign", modules_to_not_convert=["model.layers.1.mlp.*"]))
    assert model.model.layers[1].mlp.down_proj is keep
    assert isinstance(model.model.layers[0].mlp.down_proj, SignLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, SignLinear)
    assert model.config.binarymos["method"] == "sign"


def test_binarizing_twice_changes_nothing_and_binarizing_otherwise_is_refused():
    model = binarize(tiny_model("qwen3"), BinaryMoSConfig(num_experts=2))
    names = {n for n, m in model.named_modules() if isinstance(m, BinaryMoSLinear)}
    binarize(model, BinaryMoSConfig(num_experts=2))
    assert {n for n, m in model.named_modules() if isinstance(m, BinaryMoSLinear)} == names
    with pytest.raises(UnsupportedModelError,
                       match=r"binarized already \(BinaryMoSLinear, mos\); binarize sign takes a full-precision"):
        binarize(model, BinaryMoSConfig(method="sign"))  # it would have stayed E=2 under a config saying sign
    assert model.config.binarymos["num_experts"] == 2 and model.config.binarymos["method"] == "mos"


def test_a_layer_it_cannot_convert_is_a_clear_error():
    model = tiny_model("llama")
    model.model.layers[0].mlp.extra = nn.Embedding(4, 8)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.extra: Embedding"):
        binarize(model)


def test_weights_of_an_unknown_three_dimensional_layout_are_refused():
    """A 3-D weight that is not transformers' experts layout (no ``use_experts_implementation`` marks)."""
    model = tiny_model("llama")
    model.model.layers[1].mlp.experts = nn.Module()
    model.model.layers[1].mlp.experts.down_proj = nn.Parameter(torch.zeros(2, 8, 8))
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.experts: Module holds a \(2, 8, 8\) weight"):
        binarize(model)


def test_a_model_without_decoder_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="no Hugging Face config"):
        binarize(model)


@pytest.mark.parametrize("kwargs", [{"num_experts": 0}, {"num_experts": 1.5}, {"method": "ternary"}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        BinaryMoSConfig(**kwargs)
