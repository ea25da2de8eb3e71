"""Shared by the tests: tiny binarized models, their fp16 reference, a tiny tokenizer; a BinaryMoS layer whose
router and scales matter, and the packed layer's formula in float64."""
from __future__ import annotations

import copy

import torch

from binarymos import BinaryMoSConfig, binarize
from binarymos.convert import binarized_layers
from binarymos.nn import BinaryMoSLinear, binary_sign
from binarymos.pack import pack_model, save

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3: the tiny configs' pad, bos and eos
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]


def tiny_tokenizer():
    """A character-level tokenizer of printable ASCII that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def encode(text: str) -> list[int]:
    """The ids tiny_tokenizer gives ``text``, computed without it."""
    return [len(SPECIALS) + ALPHABET.index(ch) for ch in text]


def binarized(model, num_experts=2, method="mos", seed=0):
    """Binarize and give every expert and router distinct values, so that the per-token mixture matters."""
    model = binarize(model, BinaryMoSConfig(num_experts=num_experts, method=method)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in binarized_layers(model).values():
            if isinstance(layer, BinaryMoSLinear):
                layer.scale_in.mul_(torch.rand(layer.scale_in.shape, generator=g) + 0.5)
                layer.scale_out.mul_(torch.rand(layer.scale_out.shape, generator=g) + 0.5)
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    return model


def reference(model):
    """The unpacked eval-mode model holding what the file stores: exact signs, every other parameter in fp16."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in binarized_layers(ref).values():
            layer.weight.copy_(binary_sign(layer.weight))
        for p in ref.parameters():
            p.copy_(p.half().float())
    return ref.eval()


def token_ids(seed=1):
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


def packed_dir(model, directory, max_shard_size="2GB"):
    save(pack_model(model), directory, tiny_tokenizer(), max_shard_size)
    return directory


def tiny_lm(arch: str, seed: int = 0):
    """A tiny model whose vocabulary is exactly tiny_tokenizer's, so every id it emits decodes."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    config.vocab_size = len(SPECIALS) + len(ALPHABET)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def decode(ids: list[int]) -> str:
    """tiny_tokenizer's decoding without special tokens, computed without it."""
    return "".join(ALPHABET[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


def make_layer(in_f: int, out_f: int, experts: int, bias: bool, seed: int = 0) -> BinaryMoSLinear:
    """A float32 BinaryMoSLinear with a router, distinct experts and bias that actually matter."""
    torch.manual_seed(seed)
    layer = BinaryMoSLinear(in_f, out_f, num_experts=experts, bias=bias).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.scale_in.uniform_(0.5, 1.5)
        layer.scale_out.uniform_(0.5, 1.5).div_(in_f ** 0.5)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def unpack_signs64(packed: torch.Tensor, in_f: int) -> torch.Tensor:
    """+-1 (out, in) float64 from the packed bytes: input 8g + j at bit j of byte g, bit 1 = +1."""
    bits = (packed.long()[:, :, None] >> torch.arange(8)) & 1
    return (2 * bits.reshape(packed.shape[0], -1)[:, :in_f] - 1).double()


def reference64(x, packed_weight, router, scale_in, scale_out, bias) -> torch.Tensor:
    """The layer's formula in float64 on the unpacked signs (gates, scales and products unrounded)."""
    x = x.double()
    if scale_in.shape[0] == 1:
        s_in, s_out = scale_in[0].double(), scale_out[0].double()
    else:
        g = torch.softmax(x @ router.double().T, dim=-1)
        s_in, s_out = g @ scale_in.double(), g @ scale_out.double()
    y = ((x * s_in) @ unpack_signs64(packed_weight, x.shape[-1]).T) * s_out
    return y if bias is None else y + bias.double()
