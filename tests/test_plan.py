"""The memory planner against bytes counted on real tensors after a CPU step, and by hand for LLaMA-2-7B."""
import contextlib
import copy
import json

import pytest
import torch
from conftest import tiny_config

from binarymos import cli
from binarymos.convert import BinaryMoSConfig, binarize
from binarymos.footprint import load_config
from binarymos.plan import GB, count, estimate, parse_bytes
from binarymos.train import TrainConfig, distillation_loss, param_groups

B, L, E = 2, 128, 2


@contextlib.contextmanager
def recording_saved():
    """The storages autograd saves for the backward inside the block: data_ptr -> bytes."""
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        yield saved


def activation_bytes(saved: dict, model) -> int:
    """Of ``saved``, the bytes that are not the model's parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params)


def small(model_type: str, **kw):
    """A small config of ``model_type`` with SDPA attention, its dimensions large enough to weigh the terms."""
    config = tiny_config(model_type, **kw)
    config.update(dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=256))
    config._attn_implementation = "sdpa"
    return config


def one_loss(config):
    """A student of ``config`` (E scaling experts), its parameter groups trainable, and one distillation loss in
    float32 on the CPU: (student, groups, loss, the bytes autograd saved for its backward)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = binarize(copy.deepcopy(teacher), BinaryMoSConfig(num_experts=E)).requires_grad_(False)
    cfg = TrainConfig(num_experts=E)
    groups = param_groups(student, cfg)
    for p in (p for g in groups for p in g["params"]):
        p.requires_grad_(True)
    ids = torch.randint(0, 256, (B, L))
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)
    with recording_saved() as saved:
        loss, _ = distillation_loss(student(input_ids=ids, output_hidden_states=True), t_out, cfg)
    return student, groups, loss, activation_bytes(saved, student)


@pytest.fixture(scope="module")
def step():
    """A tiny LLaMA (GQA, SDPA) distilled one AdamW step in float32 on the CPU, with autograd's saved bytes."""
    config = small("llama")
    student, groups, loss, saved = one_loss(config)
    loss.backward()
    optimizer = torch.optim.AdamW(groups)
    optimizer.step()
    return config, student, optimizer, saved


def saved_under_autocast(student, cfg) -> int:
    """Bytes autograd saves (parameters excluded) for one distillation loss under the CPU's bf16 autocast."""
    ids = torch.randint(0, 256, (B, L))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        t_out = student(input_ids=ids, output_hidden_states=True)  # any teacher: only its shapes matter
    with recording_saved() as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student(input_ids=ids, output_hidden_states=True)
        distillation_loss(out, t_out, cfg)
    return activation_bytes(saved, student)


def test_one_process_under_bf16_autocast_keeps_a_float32_residual_stream_unless_bf16_compute(step):
    """What a single-GPU run does (float32 masters, bf16 autocast), on the CPU's autocast: the planner's
    r = 4 (its default for one GPU) within 15 % of autograd's saved bytes, where r = 2 is not; with the
    frozen parameters in bf16 (train's bf16_compute), r = 2 is."""
    config, student, _, _ = step
    cfg, counts = TrainConfig(num_experts=E), count(config, E)
    student_logits = B * L * config.vocab_size * 2  # bf16 under autocast
    planned = {r: (lambda t: t["activations"] + t["hidden"] + student_logits)(
        estimate(counts, gpus=1, seq_len=L, batch=B, residual=r)["terms"]) for r in (2, 4)}
    assert estimate(counts, gpus=1, seq_len=L, batch=B)["terms"] == estimate(
        counts, gpus=1, seq_len=L, batch=B, residual=4)["terms"]
    measured = saved_under_autocast(student, cfg)
    assert abs(planned[4] - measured) / measured < 0.15 < abs(planned[2] - measured) / measured, (planned, measured)
    narrow = copy.deepcopy(student)
    for p in narrow.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    measured = saved_under_autocast(narrow, cfg)
    assert abs(planned[2] - measured) / measured < 0.15, (planned, measured)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_weights_gradients_and_adamw_state_are_the_bytes_of_a_real_step(step):
    config, student, optimizer, _ = step
    terms = estimate(count(config, E), gpus=1, seq_len=L, batch=B, a=4, teacher_bytes=4)["terms"]
    assert terms["weights"] == nbytes(student.parameters())
    assert terms["gradients"] == nbytes(p.grad for p in student.parameters() if p.grad is not None)
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert terms["adamw"] == nbytes(moments)
    assert estimate(count(config, E), gpus=4, seq_len=L, batch=B)["terms"]["adamw"] == nbytes(moments) / 4


def test_activations_are_within_15_percent_of_what_autograd_saves(step):
    config, _, _, measured = step
    terms = estimate(count(config, E), gpus=1, seq_len=L, batch=B, a=4, teacher_bytes=4)["terms"]
    student_logits = B * L * config.vocab_size * 4  # of the planner's logits term, the one autograd saves
    planned = terms["activations"] + terms["hidden"] + student_logits
    assert abs(planned - measured) / measured < 0.15, (planned, measured)


@pytest.mark.parametrize("arch, moe", [
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                       shared_expert_intermediate_size=192)),  # with a shared expert
])
def test_a_mixture_of_experts_activations_are_within_15_percent_of_what_autograd_saves(arch, moe):
    """Each expert sees a quarter of the tokens here (2 of 8); counted as if it saw them all, the experts' terms
    would be four times too large."""
    config = small(arch, **moe)
    measured = one_loss(config)[3]
    terms = estimate(count(config, E), gpus=1, seq_len=L, batch=B, a=4, teacher_bytes=4)["terms"]
    planned = terms["activations"] + terms["hidden"] + B * L * config.vocab_size * 4
    assert abs(planned - measured) / measured < 0.15, (planned, measured)


def test_llama_2_7b_parameters_by_hand():
    h, m, layers, vocab = 4096, 11008, 32, 32000
    linears = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]  # q k v o, gate up, down as (in, out)
    latent = layers * sum(i * o for i, o in linears)
    extras = layers * sum(E * (i + o) + E * i for i, o in linears)  # scales in and out, router
    teacher = latent + 2 * vocab * h + (2 * layers + 1) * h
    c = count(load_config("llama-2-7b"), E)
    assert (c.teacher, c.trainable, c.student, c.binarized) == (teacher, latent + extras, teacher + extras, latent)
    plan8 = estimate(c, gpus=8, seq_len=2048, batch=1)
    assert plan8["terms"]["adamw"] == 8 * (latent + extras) // 8
    assert plan8["total_checkpointed"] < plan8["total"] < estimate(c, gpus=1, seq_len=2048, batch=1)["total"]


def test_plan_command_says_whether_it_fits(capsys):
    assert cli.main(["plan", "--config", "llama-2-7b", "--gpus", "8", "--seq-len", "2048", "--batch", "1"]) == 0
    table = capsys.readouterr().out
    assert "AdamW state" in table and "peak, gradient checkpointing** | **" in table and "fits in 72.00" in table
    assert cli.main(["plan", "--config", "llama-2-7b", "--gpus", "2", "--strategy", "ddp", "--grad-accum", "2",
                     "--batch", "1", "--json"]) == 0
    ddp = json.loads(capsys.readouterr().out)
    c = count(load_config("llama-2-7b"), 4)
    assert (ddp["strategy"], ddp["grad_accum"], ddp["terms"]["weights"]) == ("ddp", 2, 4 * c.student)  # unsharded
    assert cli.main(["plan", "--config", "llama-2-70b", "--gpus", "8", "--gpu-memory", "141GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert parse_bytes("80GB") == 80 * GB and parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141") == 141 * 10**9 and parse_bytes("141000MB") == 141 * 10**9  # a bare number is GB
    assert cli.main(["plan", "--config", "llama-2-7b", "--gpu-memory", "lots"]) == 2


def test_plan_of_an_unknown_model_is_a_one_line_error(capsys):
    assert cli.main(["plan", "--config", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("binarymos: error: /no/such/model: not a built-in config")


SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LLAMA_2_7B_8_BLOCKS = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=False)
# torch.cuda.max_memory_allocated of real runs on H100/H200 GPUs (docs/RESULTS.md), sequence 2048, E=4:
# (config, GPUs, strategy, batch per GPU, grad_accum, checkpointing, bf16_compute, fused layer, measured GB);
# sessions 2-4 ran autograd of the layer's formula (fused_layer=False), session 8 the fused layer
MEASURED_PEAKS = [
    (SMOLLM2, 1, "fsdp", 4, 2, True, False, False, 9.59), (SMOLLM2, 2, "fsdp", 4, 1, True, False, False, 7.70),
    (LLAMA_2_7B_8_BLOCKS, 1, "fsdp", 1, 2, True, False, False, 39.32),
    (LLAMA_2_7B_8_BLOCKS, 2, "fsdp", 1, 1, True, False, False, 20.13),
    (SMOLLM2, 1, "fsdp", 8, 2, False, False, False, 64.13), (SMOLLM2, 1, "fsdp", 8, 1, False, False, False, 63.66),
    (SMOLLM2, 2, "fsdp", 8, 1, False, False, False, 42.41), (SMOLLM2, 2, "ddp", 8, 1, False, False, False, 64.10),
    (SMOLLM2, 1, "fsdp", 8, 2, False, True, False, 43.66), (SMOLLM2, 2, "ddp", 8, 1, False, True, False, 43.60),
    (LLAMA_2_7B_8_BLOCKS, 1, "fsdp", 1, 2, False, False, False, 51.10),
    (LLAMA_2_7B_8_BLOCKS, 2, "ddp", 1, 1, False, False, False, 51.10),
    (LLAMA_2_7B_8_BLOCKS, 2, "fsdp", 1, 1, False, False, False, 27.56),
    (SMOLLM2, 1, "fsdp", 8, 1, False, True, True, 33.1), (SMOLLM2, 1, "fsdp", 16, 1, False, True, True, 61.5),
]


@pytest.mark.parametrize("config, gpus, strategy, batch, accum, checkpointing, bf16_compute, fused, measured",
                         MEASURED_PEAKS)
def test_estimate_within_15_percent_of_peaks_measured_on_gpus(config, gpus, strategy, batch, accum, checkpointing,
                                                               bf16_compute, fused, measured):
    from transformers import AutoConfig

    kwargs = dict(config)
    counts = count(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs), 4)
    planned = estimate(counts, gpus, 2048, batch, grad_accum=accum, strategy=strategy, fused_layer=fused,
                       residual=2 if bf16_compute else None)["total_checkpointed" if checkpointing else "total"]
    assert abs(planned / GB - measured) / measured < 0.15, (planned / GB, measured)


def test_peak_is_the_largest_moment_of_a_step_not_every_term_at_once():
    """The three moments written out from the terms: gradients exist at the start of backward only when they
    outlive the step (accumulation, DDP's buckets); FSDP2's reduce-scatter buffers only while backward runs."""
    c = count(load_config("llama-2-7b"), E)
    for gpus, strategy, accum in ((8, "fsdp", 1), (8, "fsdp", 2), (2, "ddp", 1), (1, "fsdp", 1)):
        result = estimate(c, gpus, 2048, 2, grad_accum=accum, strategy=strategy)
        t = result["terms"]
        kept = t["weights"] + t["adamw"] + t["teacher"]
        grads_at_start = t["gradients"] if accum > 1 or strategy == "ddp" else 0
        for total, activations in ((result["total"], t["activations"]),
                                   (result["total_checkpointed"], t["activations_checkpointed"])):
            moments = (kept + grads_at_start + t["gathered"] + t["logits"] + t["hidden"] + activations,
                       kept + t["gradients"] + t["gathered"] + t["reduce_scatter"] + t["last_block"],
                       kept + t["gradients"] + t["optimizer_temp"])
            assert abs(total - max(moments)) <= 3  # int() of each term
    ddp, one = estimate(c, 2, 2048, 2, strategy="ddp"), estimate(c, 1, 2048, 2)
    assert ddp["total"] == one["total"] + one["terms"]["gradients"]  # a DDP rank: one process plus its buckets
    assert estimate(c, 8, 2048, 2)["terms"]["reduce_scatter"] == 6 * c.block_trainable
    with pytest.raises(ValueError, match="strategy"):
        estimate(c, 2, 2048, 2, strategy="zero3")


def test_teacher_cache_is_the_bytes_measured_and_counts_throughout_the_step(capsys):
    """Sessions 14 and 15 (one H200): train --cache-teacher's teacher_cache_gb was 22.876 for SmolLM2's 303 blocks of
    2048 tokens (c4_wiki) and 48.771 for 646 (c4_wiki,calib); the run with the cache and CUDA graphs peaked at
    55.6 GB (batch 8, --bf16-compute, the fused layer)."""
    from transformers import AutoConfig

    kwargs = dict(SMOLLM2)
    counts = count(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs), 4)
    plain = estimate(counts, 1, 2048, 8, residual=2)
    for blocks, measured_gb in ((303, 22.876), (646, 48.771)):
        cached = estimate(counts, 1, 2048, 8, residual=2, cache_tokens=blocks * 2048)
        assert abs(cached["terms"]["teacher_cache"] / GB - measured_gb) < 0.001
        assert cached["total"] - plain["total"] == cached["terms"]["teacher_cache"]  # alive at every moment
    planned = estimate(counts, 1, 2048, 8, residual=2, cache_tokens=303 * 2048)["total"] / GB
    assert abs(planned - 55.6) / 55.6 < 0.15, planned
    args = ["plan", "--config", "smollm2-135m", "--batch", "8", "--cache-tokens", str(303 * 2048)]
    assert cli.main(args + ["--gpu-memory", "141GB"]) == 0  # an H200: 64.25 GB with the cache, within 75 %
    assert "| teacher cache (train --cache-teacher) | 22.88 |" in capsys.readouterr().out
    # an H100: beside the run's 41.4 GB the cache passes 75 % of 80 GB, so train keeps it on the host, and the GPU
    # holds one step's blocks twice (window and landing buffers): 2 x 8 x 2048 tokens x 32 tensors x 576 x 2 bytes
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    window = 2 * 8 * 2048 * 32 * 576 * 2
    assert f"| teacher cache's window and landing buffers (the cache on the host) | {window / GB:.2f} |" in out
    assert "teacher cache: 22.88 GB of page-locked host memory" in out
    assert cli.main(["plan", "--config", "smollm2-135m", "--gpus", "2", "--cache-tokens", "2048"]) == 2
    assert "one GPU" in capsys.readouterr().err
