"""The binarized linear layers: BinaryMoS (E scaling experts mixed per token), OneBit (E=1)
and the static sign baseline.

BinaryMoS (SPEC.md):
    B     = sign(W)                 with sign(0) = +1
    G     = softmax(x @ W_R)        in float32, one row of E gates per token
    s_in  = G @ S_in,  s_out = G @ S_out
    y     = ((x * s_in) @ B.T) * s_out + bias
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 forward; clipped straight-through gradient (|w| <= clip) backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.clip = clip
        return binary_sign(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * (weight.abs() <= ctx.clip).to(grad.dtype), None


def binary_sign(weight: torch.Tensor) -> torch.Tensor:
    """+1 where weight >= 0, else -1, in the weight's dtype (torch.sign maps 0 to 0)."""
    return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)


def sign_ste(weight: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    return _SignSTE.apply(weight, clip)


def gate_scores(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """Router gating scores G = softmax(x W_R) in float32, shape (..., E), for a router weight (E, in)."""
    return torch.softmax(F.linear(x, router.to(x.dtype)).float(), dim=-1)


def token_scales(x: torch.Tensor, router: torch.Tensor | None, scale_in: torch.Tensor,
                 scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-adaptive scales s_in (..., in) and s_out (..., out) in x's dtype: the experts' scales (E, in) and
    (E, out) mixed by the gates in float32. One expert (OneBit) needs no router: its scales are the vectors."""
    if scale_in.shape[0] == 1:
        return scale_in[0].to(x.dtype), scale_out[0].to(x.dtype)
    g = gate_scores(x, router)
    return (g @ scale_in.float()).to(x.dtype), (g @ scale_out.float()).to(x.dtype)


def leading_singular_pair(matrix: torch.Tensor, iters: int = 100, tol: float = 1e-7):
    """u, v with matrix ~= outer(u, v): the rank-1 SVD term, each side carrying sqrt(sigma_0).

    Power iteration in float32: for the non-negative |W| the leading pair is positive and well
    separated, so it converges in a few steps, and it costs O(out*in) per step on any device
    instead of a full SVD.
    """
    m = matrix.float()
    v = m.mean(0)
    v = v / v.norm()
    for _ in range(iters):
        u = m @ v
        u = u / u.norm()
        v_next = m.T @ u
        sigma = v_next.norm()
        v_next = v_next / sigma
        done = (v_next - v).norm() < tol
        v = v_next
        if done:
            break
    root = sigma.sqrt()
    return u * root, v * root


class BinaryMoSLinear(nn.Module):
    """A 1-bit linear layer whose scales are a per-token mixture of ``num_experts`` experts.

    Training form: ``weight`` is the latent full-precision weight, binarized on the fly with a
    straight-through estimator. ``num_experts=1`` is OneBit's dual-scale binarization (the
    router is then a constant and is skipped).
    """

    ste_clip = 1.0  # the straight-through gradient passes where |w| <= ste_clip (a training setting, not saved)

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.router = nn.Linear(in_features, num_experts, bias=False, **kw)
        self.scale_in = nn.Parameter(torch.ones(num_experts, in_features, **kw))
        self.scale_out = nn.Parameter(torch.ones(num_experts, out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int = 4, router_init_std: float = 0.02,
                    expert_init_noise: float = 0.0) -> "BinaryMoSLinear":
        """Convert a trained ``nn.Linear``: latent weight = W, every expert = rank-1 SVD of |W| (the paper's), each
        element times exp(expert_init_noise * N(0, 1)) (positive, about 1 + that noise).

        With every expert equal the mixture does not depend on the gates, so the router's gradient is exactly
        zero, and the experts' own gradients differ only by the gates' small spread; the noise breaks that symmetry
        from the first step."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, num_experts, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        u, v = leading_singular_pair(weight.abs())
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.scale_out.copy_(u.expand(num_experts, -1))
            layer.scale_in.copy_(v.expand(num_experts, -1))
            if expert_init_noise > 0 and num_experts > 1:
                for scale in (layer.scale_out, layer.scale_in):
                    scale.mul_(torch.exp(expert_init_noise * torch.randn_like(scale, dtype=torch.float32)))
            nn.init.normal_(layer.router.weight, std=router_init_std)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return gate_scores(x, self.router.weight)

    def token_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_scales(x, self.router.weight, self.scale_in, self.scale_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one expert: vector scales, whose autograd ops are cheap (the fused layer measured 10 % slower there);
        # under torch.compile inductor fuses the formula itself
        if self.num_experts == 1 or torch.compiler.is_compiling():
            return self.formula_forward(x)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _BinaryMoSFunction.apply(x, self.weight, self.router.weight, self.scale_in, self.scale_out, self.bias,
                                        self.ste_clip, compute_dtype)

    def formula_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as plain autograd ops (what torch.compile traces; autograd's gradients)."""
        s_in, s_out = self.token_scales(x)
        y = F.linear(x * s_in, sign_ste(self.weight, self.ste_clip).to(x.dtype)) * s_out
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, bias={self.bias is not None}")


class _BinaryMoSFunction(torch.autograd.Function):
    """BinaryMoSLinear's forward (E > 1) and a hand-written backward: the products by cuBLAS, and the
    per-token scaling with its gradients in single passes (``binarymos.kernels.scale_rows``), as are the sign, its
    straight-through gradient and the softmax's backward (``signs``, ``ste_gradient``, ``gates_backward``).

    Autograd of the plain formula launches a dozen elementwise kernels per layer and direction and keeps
    s_in, x * s_in, z and s_out alive for the backward; this keeps x * s_in and z: 23 % less peak memory
    when distilling SmolLM2 at batch 8 (docs/RESULTS.md), so batch 16 fits an 80 GB GPU without
    checkpointing. The products run in ``compute_dtype`` (autocast's, or x's), gates and scale gradients
    in float32, the result in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, router_weight, scale_in, scale_out, bias, clip: float, compute_dtype):
        from .kernels import scale_rows, signs

        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            binarized = signs(weight, compute_dtype)
            router = router_weight.to(x.dtype)
            gates = torch.softmax(F.linear(x2, router), dim=-1, dtype=torch.float32)
            xs = scale_rows(x2, gates, scale_in, out_dtype=compute_dtype)
            z = F.linear(xs, binarized)
            y = scale_rows(z, gates, scale_out, bias, out_dtype=x.dtype)
        ctx.save_for_backward(x2, weight, router, scale_in, scale_out, gates, binarized, xs, z)
        ctx.clip, ctx.x_shape, ctx.router_dtype = clip, x.shape, router_weight.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        from .kernels import gates_backward, scale_rows_backward, ste_gradient

        x2, weight, router, scale_in, scale_out, gates, binarized, xs, z = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dz, d_gates_out, d_scale_out = scale_rows_backward(dy, z, gates, scale_out, out_dtype=binarized.dtype)
        d_xs = dz @ binarized
        d_weight = ste_gradient(weight, dz.T @ xs, ctx.clip)
        dx, d_gates_in, d_scale_in = scale_rows_backward(d_xs, x2, gates, scale_in, out_dtype=x2.dtype)
        d_logits = gates_backward(gates, d_gates_out, d_gates_in, x2.dtype)  # softmax's, then the router's product
        dx = dx.addmm_(d_logits, router)
        d_router = (d_logits.T @ x2).to(ctx.router_dtype)
        d_bias = dy.sum(0) if ctx.needs_input_grad[5] else None
        return (dx.view(ctx.x_shape), d_weight, d_router, d_scale_in.to(scale_in.dtype),
                d_scale_out.to(scale_out.dtype), d_bias, None, None)


class SignLinear(nn.Module):
    """Static post-training baseline: y = (x @ sign(W).T) * mean_j |W_ij| (+ bias). No training."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.ones(out_features, in_features, **kw), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SignLinear":
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(binary_sign(weight))
            layer.scale.copy_(weight.abs().float().mean(dim=1))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BinarizedExperts(nn.Module):
    """The experts of a mixture-of-experts block (not BinaryMoS's scaling experts) with each expert's two matrices
    a binarized layer: ``up[i]`` (gate and up projections, or the up projection alone) and ``down[i]``.

    Transformers keeps a block's experts as 3-D tensors in one module (``gate_up_proj``, ``down_proj``: the
    ``use_experts_implementation`` layout). This takes its place and computes what transformers' generic experts
    forward computes, one expert at a time, so that each matrix is an ordinary layer to train, pack and run with
    the kernels. The routing stays the block's own (its router is kept in full precision and picks
    ``top_k_index`` and ``top_k_weights``); the replaced module's activation, gating function (``_apply_gate``),
    post-expert norm and plain attributes are kept.
    """

    def __init__(self, experts: nn.Module, up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        for key, value in vars(experts).items():  # has_gate, has_bias, config, a gating function's constants ...
            if not key.startswith("_") and not hasattr(self, key) and not isinstance(value, torch.Tensor):
                setattr(self, key, value)
        for key, module in experts.named_children():  # the activation, a post-expert norm
            self.add_module(key, module)
        self.gate_function = type(experts)._apply_gate
        self.up, self.down = nn.ModuleList(up), nn.ModuleList(down)

    def layers(self) -> list[nn.Module]:
        """Every expert's binarized layers: each sees only the tokens routed to its expert."""
        return [*self.up, *self.down]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for expert in top_k_index.unique().tolist():
            if expert >= len(self.down):  # a sentinel: the slot is dropped
                continue
            token, slot = torch.where(top_k_index == expert)
            h = self.up[expert](hidden_states[token])
            h = self.gate_function(self, h) if self.has_gate else self.act_fn(h)
            h = self.down[expert](h)
            if getattr(self, "has_post_expert_norm", False):
                h = self.post_expert_norm(h)
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).float())
        return out.to(hidden_states.dtype)


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """Signs of an (out, in) weight packed 8 per byte along the input dimension -> uint8 (out, ceil(in/8)).

    Bit j (least significant first) of byte k of row o is 1 where weight[o, 8k + j] >= 0 (+1), 0 for -1.
    Rows are padded with 0 bits up to a multiple of 8 inputs. Little-endian bytes, so where ``in`` is a
    multiple of 32 the same memory read as int32 holds inputs 32w .. 32w+31 in bits 0..31 of word w.
    """
    out_features, in_features = weight.shape
    bits = (weight >= 0).to(torch.uint8)
    pad = (-in_features) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    bits = bits.view(out_features, -1, 8)
    shifts = torch.arange(8, device=weight.device, dtype=torch.uint8)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


@functools.cache
def byte_signs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): the +1/-1 of bits 0..7 of every byte value, the signs ``pack_signs`` puts in that byte. Made outside
    inference mode even when first asked for inside it, so that the cached table also serves products under autograd."""
    with torch.inference_mode(False):
        bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        return (bits * 2 - 1).to(dtype)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) matrix of +1/-1 that ``pack_signs`` packed: each byte looked up in ``byte_signs``, one pass
    (on 2 CPU cores 1.2-11x faster than shifting and masking the bits, docs/RESULTS.md)."""
    signs = F.embedding(packed.long(), byte_signs(dtype, packed.device))
    return signs.view(packed.shape[0], -1)[:, :in_features]


class PackedBinaryMoSLinear(nn.Module):
    """Inference form of BinaryMoSLinear: signs packed 8 per byte, scales and router in 16 bits.

    Holds buffers, not parameters. ``forward`` computes exactly what the training form computes in
    eval mode; on CUDA with Triton it runs the fused kernels of ``binarymos.kernels``.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool = False,
                 device=None, dtype=torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.register_buffer("packed_weight", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                          device=device))
        # E = 1 (OneBit): the gate is the constant 1, so there is no router to store
        self.register_buffer("router", torch.zeros(num_experts, in_features, dtype=dtype, device=device)
                             if num_experts > 1 else None)
        self.register_buffer("scale_in", torch.ones(num_experts, in_features, dtype=dtype, device=device))
        self.register_buffer("scale_out", torch.ones(num_experts, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_binarized(cls, layer: BinaryMoSLinear, dtype: torch.dtype = torch.float16) -> "PackedBinaryMoSLinear":
        packed = cls(layer.in_features, layer.out_features, layer.num_experts, layer.bias is not None,
                     device=layer.weight.device, dtype=dtype)
        packed.packed_weight.copy_(pack_signs(layer.weight))
        if packed.router is not None:
            packed.router.copy_(layer.router.weight)
        packed.scale_in.copy_(layer.scale_in)
        packed.scale_out.copy_(layer.scale_out)
        if layer.bias is not None:
            packed.bias.copy_(layer.bias)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import binary_mos_linear  # Triton on CUDA, the plain formula elsewhere

        return binary_mos_linear(x, self.packed_weight, self.router, self.scale_in, self.scale_out, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, bias={self.bias is not None}")
