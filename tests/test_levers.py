"""The recipe levers of issue 5: STE clip, trained norms, router init, expert init (defaults keep the measured recipe)."""
import pytest
import torch
import torch.nn.functional as F

from binarymos.nn import BinaryMoSLinear, binary_sign
from binarymos.train import TrainConfig, param_groups, prepare, train


def test_ste_clip_passes_the_gradient_only_where_the_latent_weight_is_small():
    torch.manual_seed(0)
    layer = BinaryMoSLinear.from_linear(torch.nn.Linear(8, 4, bias=False), num_experts=1)
    with torch.no_grad():
        layer.weight.uniform_(-2, 2)
    layer.ste_clip = 0.5
    x = torch.randn(3, 8)
    layer(x).square().sum().backward()
    signs = binary_sign(layer.weight.detach()).requires_grad_()  # the same function of the signs, as a leaf
    (F.linear(x * layer.scale_in[0].detach(), signs) * layer.scale_out[0].detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, signs.grad * (layer.weight.detach().abs() <= 0.5))
    assert 0 < (layer.weight.grad != 0).float().mean() < 0.5  # about a quarter of U(-2, 2) lies within 0.5


def test_train_norms_trains_every_norm_and_only_with_the_option(teacher_dir, text_file, tmp_path):
    base = dict(model=str(teacher_dir), data=str(text_file), seq_len=16, batch_size=2, device="cpu",
                lr_scale=1e-2, max_steps=2)
    _, student, _, _ = prepare(TrainConfig(**base, out=str(tmp_path / "a")))
    norms = [n for n, _ in student.named_parameters() if "norm" in n]
    assert norms and not any(p.requires_grad for n, p in student.named_parameters() if "norm" in n)
    trained = train(TrainConfig(**base, out=str(tmp_path / "b"), train_norms=True))
    moved = [n for n, p in trained.named_parameters() if "norm" in n and not torch.equal(p, torch.ones_like(p))]
    assert sorted(moved) == sorted(norms)  # LLaMA norms start at 1
    ids = {id(p) for p in param_groups(trained, TrainConfig(train_norms=True))[1]["params"]}
    assert all(id(p) in ids for n, p in trained.named_parameters() if "norm" in n)


def test_router_init_std_sets_the_routers_spread(teacher_dir, text_file, tmp_path):
    cfg = TrainConfig(model=str(teacher_dir), data=str(text_file), seq_len=16, device="cpu", out=str(tmp_path),
                      router_init_std=0.5)
    _, student, _, _ = prepare(cfg)
    routers = torch.cat([m.router.weight.flatten() for m in student.modules() if isinstance(m, BinaryMoSLinear)])
    assert abs(routers.std().item() - 0.5) < 0.05 and abs(routers.mean().item()) < 0.05


def _svd_scales(linear: torch.nn.Linear):
    """The paper's initial scales in float64: |W| ~= u v^T, u = U[:, 0] sqrt(s0), v = sqrt(s0) V[0]."""
    u, s, vh = torch.linalg.svd(linear.weight.detach().double().abs())
    return (u[:, 0] * s[0].sqrt()).abs(), (vh[0] * s[0].sqrt()).abs()


def test_expert_init_noise_spreads_the_experts_log_normally_around_the_svd_scales(teacher_dir, text_file, tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    u, v = _svd_scales(linear)
    equal = BinaryMoSLinear.from_linear(linear, num_experts=4)
    torch.testing.assert_close(equal.scale_out.double(), u.expand(4, -1), rtol=1e-4, atol=0)
    torch.testing.assert_close(equal.scale_in.double(), v.expand(4, -1), rtol=1e-4, atol=0)
    noisy = BinaryMoSLinear.from_linear(linear, num_experts=4, expert_init_noise=0.1)
    logs = torch.cat([(noisy.scale_out.double() / u).log().flatten(), (noisy.scale_in.double() / v).log().flatten()])
    assert abs(logs.std().item() - 0.1) < 0.005 and abs(logs.mean().item()) < 0.005  # 1,536 draws of N(0, 0.1)
    one = BinaryMoSLinear.from_linear(linear, num_experts=1, expert_init_noise=0.1)  # OneBit: nothing to break
    torch.testing.assert_close(one.scale_out[0].double(), u, rtol=1e-4, atol=0)

    cfg = TrainConfig(model=str(teacher_dir), data=str(text_file), seq_len=16, device="cpu", out=str(tmp_path),
                      expert_init_noise=0.1)  # and through train's config
    _, student, _, _ = prepare(cfg)
    layers = [m for m in student.modules() if isinstance(m, BinaryMoSLinear)]
    assert layers and all((m.scale_in.std(0) > 0).all() for m in layers)


def test_the_routers_gradient_is_zero_while_the_experts_are_equal():
    """Why the noise: with equal experts the mixture ignores the gates, so the router's gradient is zero up to the
    float32 rounding of the mixture (a float64 layer), and it is not once the experts differ."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False).double()
    x, upstream = torch.randn(16, 64, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    norms = []
    for noise in (0.0, 0.05):
        layer = BinaryMoSLinear.from_linear(linear, num_experts=4, router_init_std=0.5, expert_init_noise=noise)
        (layer.formula_forward(x) * upstream).sum().backward()
        norms.append(layer.router.weight.grad.norm().item() / layer.scale_in.grad.norm().item())
    assert norms[0] < 1e-6 and norms[1] > 1e-2  # measured: 1.9e-7 and 2.4e-2


def test_a_negative_or_nan_init_spread_is_refused():
    for bad in (dict(expert_init_noise=-0.1), dict(expert_init_noise=float("nan")), dict(router_init_std=-1.0)):
        with pytest.raises(ValueError, match="must be >= 0"):
            TrainConfig(**bad)
