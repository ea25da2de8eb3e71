import os
from pathlib import Path

import pytest
import torch

# before any test imports transformers (huggingface_hub reads it once): no test may reach the hub, which CI lacks;
# unset, a name the hub is asked for retries for ~30 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ../shared/data beside the checkout, or BINARYMOS_DATA_DIR where the text is elsewhere (the GPU machine)
SHARED_DATA = Path(os.environ.setdefault("BINARYMOS_DATA_DIR",
                                         str(Path(__file__).resolve().parents[1].parent / "shared" / "data")))

# model_type -> tiny config kwargs (random weights; enough to exercise every code path)
TINY = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
    "phi3": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32, "num_attention_heads": 4, "max_position_embeddings": 128},
    "gpt_neox": {"num_attention_heads": 4},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
}
ARCHS = list(TINY)
# more families, checked once each (test_pack.py's round trip): the generic block finder and layer swap cover them
MORE_TINY = {
    "olmo": {}, "olmo2": {}, "olmo3": {}, "granite": {}, "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16},
    "phi": {}, "falcon": {"num_kv_heads": 1, "new_decoder_architecture": True}, "starcoder2": {},
    "gpt_bigcode": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}, "stablelm": {}, "cohere": {},
    "smollm3": {}, "glm": {"head_dim": 16}, "helium": {"head_dim": 16}, "exaone4": {}, "seed_oss": {"head_dim": 16},
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "rotary_dim": 8},
    "bloom": {"n_head": 2, "n_layer": 2}, "ministral": {"head_dim": 16}, "ministral3": {},
}

# mixture-of-experts families (transformers' 3-D experts layout): plain, with a shared expert and its gate,
# transposed with biases and its own gating function, a first dense block
MOE_TINY = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                "layer_types": ["full_attention", "sliding_attention"]},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": None},
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "gpt2":
        kwargs = dict(vocab_size=128, bos_token_id=1, eos_token_id=2)
    kwargs.update({**TINY, **MORE_TINY, **MOE_TINY}.get(model_type, {}), **overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def killed_after_first_checkpoint(monkeypatch) -> None:
    """The training process dies (KeyboardInterrupt) right after it writes its first checkpoint."""
    from binarymos import train as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)


def sigterm_during_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process while training step ``step`` (0-based) computes its loss."""
    import signal

    from binarymos import train as train_mod

    real_loss, calls = train_mod.distillation_loss, {"n": 0}

    def loss_then_signal(*args):
        calls["n"] += 1
        if calls["n"] == step + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    monkeypatch.setattr(train_mod, "distillation_loss", loss_then_signal)


def exit_status(argv: list[str]) -> int:
    """What `binarymos ARGV` exits with: main's return value, or argparse's own exit (SystemExit) for bad options."""
    from binarymos.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny LLaMA with a character tokenizer, saved like a Hugging Face model directory."""
    from pack_helpers import tiny_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    tiny_lm("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """~20k characters of real English (WikiText-2 train) for tiny training runs."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text((SHARED_DATA / "wikitext-2-raw" / "wiki.train.first1MB.txt").read_text()[:20000])
    return path
