"""The recipe levers of issue 5: STE clip, trained norms, router init (defaults keep the measured recipe)."""
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
