"""Mixture-of-experts models: each expert's matrices binarized, the routers kept, against transformers' own experts
forward and the BinaryMoS formula written out in float64; the packed round trip; a tiny distillation."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE_TINY, tiny_config
from pack_helpers import binarized, logits, packed_dir, reference, tiny_tokenizer
from transformers import AutoModelForCausalLM

import binarymos
from binarymos import BinaryMoSConfig, binarize
from binarymos.convert import binarized_layers
from binarymos.nn import BinarizedExperts, PackedBinaryMoSLinear, SignLinear

KEEP_DENSE = ["*.self_attn*", "*shared_expert*", "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"]


def tiny_moe(arch, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype).eval()


def three_d_experts(model):
    return [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)
            and m.down_proj.dim() == 3]


@pytest.mark.parametrize("arch", MOE_TINY)
def test_sign_experts_compute_what_transformers_computes_with_sign_weights(arch):
    """Static signs (sign(W) * mean |W| per output row) for every expert matrix, against the model's own eager experts
    forward holding those dense weights, in float64: the routing, gating, biases and layout are the model's."""
    model = tiny_moe(arch, torch.float64)
    want_model = copy.deepcopy(model)
    want_model.config._experts_implementation = "eager"
    for experts in three_d_experts(want_model):
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            weight = getattr(experts, name, None)
            if weight is not None:
                w = weight.data.transpose(1, 2) if experts.is_transposed else weight.data  # (experts, out, in)
                w = torch.where(w >= 0, 1.0, -1.0).double() * w.abs().mean(-1, keepdim=True)
                weight.data.copy_(w.transpose(1, 2) if experts.is_transposed else w)
    binarize(model, BinaryMoSConfig(method="sign", modules_to_not_convert=KEEP_DENSE))
    assert not three_d_experts(model) and any(isinstance(m, BinarizedExperts) for m in model.modules())
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want_model(ids).logits, rtol=1e-6, atol=1e-6)


def test_binarymos_experts_follow_the_formula_per_token_and_chosen_expert():
    """y_t = sum over the router's k choices of w_tk * down_k(silu(g) * u), [g, u] = up_k(x_t), each layer
    ((x * G S_in) @ sign(W).T) * (G S_out) with G = softmax(x R.T): written out in float64 with distinct experts
    (the layer computes its gates in float32)."""
    model = binarized(tiny_moe("mixtral", torch.float64), num_experts=3)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 1], [0, 2], [1, 0], [3, 2]])
    weights = torch.rand(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def layer(lin, v):
        gates = torch.softmax(v @ lin.router.weight.T, dim=-1)
        sign = torch.where(lin.weight >= 0, 1.0, -1.0).double()
        return ((v * (gates @ lin.scale_in)) @ sign.T) * (gates @ lin.scale_out)

    want = torch.zeros_like(x)
    for t in range(7):
        for k in range(2):
            e = int(index[t, k])
            gate, up = layer(experts.up[e], x[t:t + 1]).chunk(2, dim=-1)
            want[t] += weights[t, k] * layer(experts.down[e], F.silu(gate) * up)[0]
    close = dict(rtol=1e-6, atol=1e-6 * float(want.abs().max()))  # the gates are computed in float32
    with torch.no_grad():
        torch.testing.assert_close(experts(x, index, weights), want, **close)
        dropped = experts(x, torch.where(index == 3, 4, index), weights)  # 4 = no expert: the slot adds nothing
        torch.testing.assert_close(dropped, experts(x, index, weights * (index != 3)), **close)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routers_and_shared_expert_gates_stay_in_full_precision(arch):
    model = tiny_moe(arch)
    router = copy.deepcopy(model.model.layers[0].mlp.gate)
    binarize(model, BinaryMoSConfig(num_experts=2))
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate) is type(router) and torch.equal(mlp.gate.weight, router.weight)
    names = {name.split(".", 3)[3] for name in binarized_layers(model) if ".layers.0." in name}
    assert {f"mlp.experts.{part}.{i}" for part in ("up", "down") for i in range(4)} <= names
    assert not any(name.startswith("mlp.gate") for name in names)
    if arch == "qwen2_moe":
        assert type(mlp.shared_expert_gate) is torch.nn.Linear
        assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"} <= names


def test_expert_matrices_are_the_experts_slices_with_their_biases():
    """gpt-oss stores its experts transposed, (experts, in, out), with biases: each binarized matrix is W[e].T."""
    model = tiny_moe("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    gate_up, gate_up_bias = experts.gate_up_proj.detach().clone(), experts.gate_up_proj_bias.detach().clone()
    binarize(model, BinaryMoSConfig(method="sign"))
    layer = model.model.layers[0].mlp.experts.up[2]
    assert isinstance(layer, SignLinear) and (layer.in_features, layer.out_features) == gate_up.shape[1:]
    torch.testing.assert_close(layer.scale, gate_up[2].T.abs().mean(1))
    assert torch.equal(layer.bias, gate_up_bias[2])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_packed_round_trip_is_bit_exact_and_transformers_loads_it(arch, tmp_path):
    model = binarized(tiny_moe(arch))
    want = logits(reference(model))
    directory = packed_dir(model, tmp_path / "packed")
    loaded = binarymos.load(directory, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.experts.up[0], PackedBinaryMoSLinear)
    assert torch.equal(logits(loaded), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)), want)


def moe_run(text_file, tmp_path, **kw):
    from binarymos.train import TrainConfig

    tiny_moe("mixtral").save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    return TrainConfig(**{**dict(model=str(tmp_path / "teacher"), data=str(text_file), out=str(tmp_path / "run"),
                                 seq_len=32, batch_size=2, max_steps=25, num_experts=2, save_every=100,
                                 lr_weight=1e-3, lr_scale=1e-2, device="cpu"), **kw})


def test_a_tiny_mixture_of_experts_distils_and_saves_a_loadable_model(text_file, tmp_path):
    """Saved under the binarized model's own names (transformers would write Mixtral's block_sparse_moe)."""
    from binarymos.models import load_model
    from binarymos.train import train

    student = train(moe_run(text_file, tmp_path))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-5:]) < 0.9 * sum(r["loss"] for r in log[:5])
    loaded, _ = load_model(str(tmp_path / "run" / "model"))
    ids = torch.randint(4, 90, (1, 16))
    torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_cuda_graphs_are_refused_for_a_mixture_of_experts_before_any_step(text_file, tmp_path):
    from binarymos.train import prepare

    with pytest.raises(ValueError, match="cuda_graphs: a mixture of experts picks each expert's tokens on the host"):
        prepare(moe_run(text_file, tmp_path, cuda_graphs=True))
    assert not (tmp_path / "run").exists()


def test_analyze_chooses_layers_that_see_the_whole_text_and_refuses_an_experts_layer():
    from binarymos.analyze import choose_layers

    model = binarized(tiny_moe("mixtral"))
    assert list(choose_layers(model, None)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert list(choose_layers(model, "*.0.self_attn.o_proj")) == ["model.layers.0.self_attn.o_proj"]
    with pytest.raises(ValueError, match="names layers of a mixture's experts"):
        choose_layers(model, "*.experts.up.1")
