"""`binarize(model, config)`: replace every linear layer inside the decoder blocks of a Hugging
Face causal LM with a binarized one, in place. Embeddings, norms and the LM head stay as they are;
so do the routers of mixture-of-experts blocks, whose experts' matrices are binarized one by one.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .nn import BinarizedExperts, BinaryMoSLinear, PackedBinaryMoSLinear, SignLinear

METHODS = ("mos", "sign")


class UnsupportedModelError(ValueError):
    """The model has no decoder blocks binarymos can find, or a layer it cannot convert."""


@dataclass
class BinaryMoSConfig:
    """How to binarize a model.

    method: "mos" trains token-adaptive scales (BinaryMoS; ``num_experts=1`` is OneBit);
            "sign" is the static post-training baseline sign(W) * mean|W| per output row.
    modules_to_not_convert: fnmatch patterns of module names (relative to the model) to keep
            in full precision, e.g. ``["*.mlp.down_proj"]``.
    """

    num_experts: int = 4
    method: str = "mos"
    modules_to_not_convert: list[str] = field(default_factory=list)
    router_init_std: float = 0.02
    expert_init_noise: float = 0.0  # relative std of each expert's initial scales around the SVD's (0: all equal)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if int(self.num_experts) != self.num_experts or self.num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts}")
        if not (self.router_init_std >= 0 and self.expert_init_noise >= 0):  # NaN fails both
            raise ValueError(f"router_init_std and expert_init_noise must be >= 0, got {self.router_init_std} and "
                             f"{self.expert_init_noise}")

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the one whose length is the config's layer count.

    Found generically (no table of model families): Hugging Face decoders keep their blocks in a
    single ModuleList of ``num_hidden_layers`` modules of one class (``model.layers``,
    ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers`` ...).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no Hugging Face config; "
                                    "cannot find its decoder blocks")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers and len(module) > 0
                  and len({type(block) for block in module}) == 1]
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected one list of {num_layers} decoder blocks, found {found}")
    return candidates[0]


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """An equivalent nn.Linear view of a Linear or a GPT-2 style Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(module.weight.detach().T, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return linear
    return None


def _make_layer(linear: nn.Linear, config: BinaryMoSConfig, from_weights: bool) -> nn.Module:
    if not from_weights:  # shapes only: the weights come from a checkpoint next
        kw = {"bias": linear.bias is not None, "device": linear.weight.device, "dtype": linear.weight.dtype}
        if config.method == "sign":
            return SignLinear(linear.in_features, linear.out_features, **kw)
        return BinaryMoSLinear(linear.in_features, linear.out_features, config.num_experts, **kw)
    if config.method == "sign":
        return SignLinear.from_linear(linear)
    return BinaryMoSLinear.from_linear(linear, config.num_experts, config.router_init_std, config.expert_init_noise)


@torch.no_grad()
def binarize(model: nn.Module, config: BinaryMoSConfig | None = None, from_weights: bool = True) -> nn.Module:
    """Binarize every linear layer of the decoder blocks of ``model`` in place; returns the model.

    With ``from_weights=False`` the layers only get their shapes (for loading a saved binarized
    model without paying for the SVD initialisation).
    """
    from .pack import PackedSignLinear

    config = config or BinaryMoSConfig()
    done = next(((name, m) for name, m in model.named_modules()
                 if isinstance(m, (BinaryMoSLinear, SignLinear, PackedBinaryMoSLinear, PackedSignLinear))), None)
    if done is not None:
        had = getattr(model.config, "binarymos", None)
        if had == config.to_dict():  # binarized so already: nothing to do
            return model
        # its layers would stay as they are, under a config that says otherwise
        raise UnsupportedModelError(f"{done[0]}: the model is binarized already ({type(done[1]).__name__}"
                                    f"{', ' + had['method'] if had else ''}); binarize {config.method} takes a "
                                    "full-precision model")
    blocks_name, blocks = decoder_blocks(model)
    for block_index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{block_index}"
        routers = _routers(block)
        for name, module in list(block.named_modules()):
            full_name = f"{prefix}.{name}" if name else prefix
            if name in routers or _inside_binarized(block, name) or any(
                    fnmatch.fnmatch(full_name, pattern) for pattern in config.modules_to_not_convert):
                continue
            parent_name, _, child = name.rpartition(".")
            linear = _as_linear(module)
            if linear is not None:
                setattr(block.get_submodule(parent_name), child, _make_layer(linear, config, from_weights))
                continue
            if _is_fused_experts(module):
                setattr(block.get_submodule(parent_name), child, _binarized_experts(module, config, from_weights))
                continue
            own_matrices = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if own_matrices:
                raise UnsupportedModelError(
                    f"{full_name}: {type(module).__name__} holds a {tuple(own_matrices[0].shape)} weight that is "
                    "not an nn.Linear or Conv1D; binarymos cannot convert it (add it to modules_to_not_convert "
                    "to keep it in full precision)")
    model.config.binarymos = config.to_dict()
    return model


def _inside_binarized(block: nn.Module, name: str) -> bool:
    """True for a binarized layer itself or any module inside one: a child of a linear layer or experts module
    this binarize has just replaced (binarize refuses a model binarized before, so no other is there)."""
    parts = name.split(".") if name else []
    return any(isinstance(block.get_submodule(".".join(parts[:i])), (BinaryMoSLinear, SignLinear, BinarizedExperts))
               for i in range(1, len(parts) + 1))


def _is_fused_experts(module: nn.Module) -> bool:
    """A mixture-of-experts block's experts in transformers' 3-D layout (marked by ``use_experts_implementation``,
    which sets ``has_gate``): ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` of shape (experts, out, in),
    or (experts, in, out) where ``is_transposed``."""
    if not hasattr(module, "has_gate") or not hasattr(module, "_apply_gate"):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in (up, down))


def _routers(block: nn.Module) -> set[str]:
    """Names (within the block) of the modules beside fused experts whose weight has as many rows as there are
    experts, or one (a shared expert's gate): the routers, which stay in full precision."""
    names = set()
    for name, experts in block.named_modules():
        if _is_fused_experts(experts):
            parent_name = name.rpartition(".")[0]
            for child_name, child in block.get_submodule(parent_name).named_children():
                weight = getattr(child, "weight", None)
                if child is not experts and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                        and weight.shape[0] in (experts.down_proj.shape[0], 1):
                    names.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def _binarized_experts(experts: nn.Module, config: BinaryMoSConfig, from_weights: bool) -> BinarizedExperts:
    """Each expert's matrices as binarized layers (views of the 3-D tensors as ``nn.Linear``)."""
    def layers(name: str) -> list[nn.Module]:
        weight = getattr(experts, name).detach()
        bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        out = []
        for i in range(weight.shape[0]):
            w = weight[i].T if experts.is_transposed else weight[i]
            linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias[i].detach(), requires_grad=False)
            out.append(_make_layer(linear, config, from_weights))
        return out

    return BinarizedExperts(experts, layers("gate_up_proj" if experts.has_gate else "up_proj"), layers("down_proj"))


def binarized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer for every binarized layer of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (BinaryMoSLinear, SignLinear))}
