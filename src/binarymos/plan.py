"""`binarymos plan`: the memory per GPU of a distillation run, from a model config alone.

Parameters are counted exactly on a meta-device copy of the model binarized like train.py does it
(which layers are trained comes from ``train.param_groups``). Per GPU, with W GPUs sharing the
student under FSDP2 (W = 1 for one process and for each DDP rank, which holds the whole run), a
micro-batch of B sequences of L tokens (T = B*L) per GPU, n decoder layers, hidden size h,
vocabulary V and a = 2 bytes per activation (bf16):

    weights      4 * P_student / W        fp32 master: latent weights, scales, router, frozen embeddings/norms/head
    gradients    4 * P_train / W
    adamw        8 * P_train / W          exp_avg and exp_avg_sq in fp32
    teacher      2 * P_teacher / W        bf16, frozen
    gathered     2 * P_root  (+ for W > 1: 2*2*Pb_student)
                 the student's root unit (embeddings, LM head) in bf16 from forward to backward; under
                 FSDP2 also the block it computes and the one it prefetches, in bf16
    reduce_scatter  for W > 1: 6 * Pb_train    in backward, one block's bf16 gradients and their fp32 copy
    optimizer_temp  4 * P_train / W        foreach AdamW's sqrt(exp_avg_sq), one temporary per parameter
    activations  no checkpointing:  T * n * A  +  2 * P_binarized          (A per token per layer, below)
                 checkpointing:     T * n * r * h  +  T * A  +  2 * P_binarized / n
                 2 * P_binarized: sign(W) in bf16, saved by every binarized matmul for its backward, unsharded
    last_block   T * A  +  2 * P_binarized / n      what the backward of the first block still holds
    logits       T * V * 3a  +  3 * 4 * min(T, 4096) * V     student and teacher logits, the student's
                 logit gradient, one float32 chunk of the KL (train.kl_sum) recomputed in backward
    hidden       T * h * (a * (n + 1) + 8 * n)               teacher hidden states, float32 copies in the MSE
    teacher_cache  C * (n + 2) * h * a    train --cache-teacher, C training tokens: the residual stream entering
                 every block, the last block's output and the head's input, kept on the GPU for the whole run
                 (session 14 and 15 measured 22.88 and 48.77 GB for SmolLM2's 0.62 M and 1.32 M tokens: the formula's).
                 Where the run and the cache together pass 75 % of the GPU, train keeps the cache in host memory
                 and the GPU a window of one step's blocks and landing buffers as large: C = 2 * T * grad_accum

The terms are not all alive at once. The peak is the largest of three moments of a step:

    (weights + adamw + teacher + teacher_cache are alive throughout)
    backward starts  weights + adamw + teacher + gathered + logits + hidden + activations
                     (+ gradients, if they outlive the step: grad_accum > 1, or DDP's gradient buckets)
    backward ends    weights + adamw + teacher + gradients + gathered + reduce_scatter + last_block
    optimizer step   weights + adamw + teacher + gradients + optimizer_temp

(train.py runs the teacher's forward first, so its gathered FSDP2 units are freed before the student
builds its activations, and zero_grad(set_to_none=True) frees the gradients between steps.) Counting
every term at once, as this planner first did, was 20.6 % above the measured peak of FSDP2 at the
LLaMA-2-7B shape (docs/SCALING.md).

    A = 3r * h                           block inputs of attention, o_proj and the MLP
      + sum over linears of a * (in + out) + 4E
                                          x*s_in as the matmul's input (a), the matmul's output (a),
                                          gates (E > 1); autograd of the plain formula (``--compile all``
                                          traces it) also keeps s_in and s_out: (r + a) * (in + out) + 4E
      + 8h                                two RMSNorms in float32
      + a * (2h + 2kv) + 4 * heads        attention (flash/SDPA): q, k, v, output, log-sum-exp
      + 4r * i                            MLP: down_proj's input, gate output, its SiLU, up output

In a mixture of experts each expert's linears count at the share of the tokens the router sends it
(num_experts_per_tok / experts), and the MLP term is, per expert, that share of 4r * i_e + 2r * h (its
gathered input and weighted output), plus 4r * i_s for a shared expert.

r is the width of the student's residual stream and of what is computed from it outside the matmuls.
Under FSDP2 the student computes with bf16 copies of its parameters: r = a. In one process its
parameters are the float32 masters, so its embeddings, norms and scales are float32 and autocast
narrows only the matmuls: r = 4 (measured on an H100, batch 8 x 2048, no checkpointing: 63.66 GB
peak, where r = a had planned 44.07 GB; docs/RESULTS.md), unless train's ``bf16_compute`` holds its
frozen parameters in bf16: r = 2.

GB = 10^9 bytes. The estimate is what ``torch.cuda.max_memory_allocated`` should report; the CUDA
context and NCCL buffers come on top, so a run "fits" when the estimate is at most 90 % of the GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

GB = 10**9
FIT_FRACTION = 0.9
TRAIN_FIT_FRACTION = 0.75  # what train itself plans within (train._fits_gpu says why)
KL_CHUNK = 4096  # train.kl_sum


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a teacher and its binarized student (largest block for the per-block terms)."""

    teacher: int
    student: int
    trainable: int
    binarized: int          # sum of in * out over the binarized linears
    block_student: int
    block_trainable: int
    root_student: int       # outside the decoder blocks: embeddings, final norm, LM head
    linears: tuple          # (in, out, share of the tokens it sees) of one block's binarized linears
    layers: int
    hidden: int
    mlp: float              # widths the MLP keeps per token beyond its matmuls (count(); 4 * intermediate if dense)
    kv: int                 # key/value width: kv heads * head dim
    heads: int
    vocab: int
    num_experts: int


def count(config, num_experts: int = 4) -> ModelCounts:
    """Exact parameter counts, from meta-device models (no memory, any Hugging Face decoder)."""
    from transformers import AutoModelForCausalLM

    from .convert import BinaryMoSConfig, binarize, decoder_blocks
    from .nn import BinarizedExperts, BinaryMoSLinear
    from .train import TrainConfig, param_groups

    numel = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        student = binarize(AutoModelForCausalLM.from_config(config), BinaryMoSConfig(num_experts=num_experts),
                           from_weights=False)
    trainable = {p for g in param_groups(student, TrainConfig(num_experts=num_experts)) for p in g["params"]}
    blocks = decoder_blocks(student)[1]
    block = max(blocks, key=numel)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # a mixture's expert sees num_experts_per_tok / (its experts) of the tokens, on average
    mixtures = [(name, m) for name, m in block.named_modules() if isinstance(m, BinarizedExperts)]
    share = {id(layer): getattr(text, "num_experts_per_tok", 1) / len(experts.down)
             for _, experts in mixtures for layer in experts.layers()}
    linears = tuple((m.in_features, m.out_features, share.get(id(m), 1.0))
                    for m in block.modules() if isinstance(m, BinaryMoSLinear))
    # down_proj's input, the gate's output, its SiLU and the up output
    mlp = 4 * getattr(text, "intermediate_size", 4 * text.hidden_size)
    if mixtures:  # each chosen expert: those four of its own width, its gathered input and weighted output
        mlp = sum(share[id(down)] * (4 * down.in_features + 2 * down.out_features)
                  for _, experts in mixtures for down in experts.down)
        mlp += sum(4 * m.in_features for name, experts in mixtures  # a shared expert's down projection
                   for m in block.get_submodule(name.rpartition(".")[0]).modules()
                   if isinstance(m, BinaryMoSLinear) and id(m) not in share
                   and m.out_features == text.hidden_size != m.in_features)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCounts(
        teacher=numel(teacher), student=numel(student), trainable=sum(p.numel() for p in trainable),
        binarized=len(blocks) * sum(i * o for i, o, _ in linears),
        block_student=numel(block),
        block_trainable=sum(p.numel() for p in block.parameters() if p in trainable),
        root_student=numel(student) - sum(numel(b) for b in blocks), linears=linears, layers=len(blocks),
        hidden=text.hidden_size, mlp=mlp,
        kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, heads=heads, vocab=text.vocab_size,
        num_experts=num_experts)


def activation_bytes_per_token_layer(c: ModelCounts, a: int = 2, r: int = 2, fused_layer: bool = True) -> int:
    """A: bytes autograd keeps per token per decoder layer for the backward (see the module docstring)."""
    h, e = c.hidden, c.num_experts
    scales = r if e > 1 and not fused_layer else 0  # s_in and s_out: E = 1's are parameters, not activations
    linears = sum(share * ((scales + a) * (n_in + n_out) + (4 * e if e > 1 else 0))
                  for n_in, n_out, share in c.linears)
    return 3 * r * h + round(r * c.mlp + linears) + 8 * h + a * (2 * h + 2 * c.kv) + 4 * c.heads


def estimate(c: ModelCounts, gpus: int, seq_len: int, batch: int, a: int = 2, teacher_bytes: int = 2,
             residual: int | None = None, grad_accum: int = 1, strategy: str = "fsdp", fused_layer: bool = True,
             cache_tokens: int = 0) -> dict:
    """Bytes per GPU of each term, and the peak with and without gradient checkpointing.

    gpus: the ranks; under strategy "fsdp" they shard the student and the teacher, under "ddp" each
    holds the whole run and keeps its gradients between steps (DDP's buckets). residual: bytes per
    value of the student's residual stream (r); default: 4 when one process holds the whole student
    (float32 masters), a under FSDP2 (bf16 parameters); train's bf16_compute makes it 2 there too.
    fused_layer: BinaryMoSLinear's own backward (False: autograd of its formula, as ``--compile all``).
    cache_tokens: training tokens whose teacher outputs train's --cache-teacher keeps (one process; 0: none).
    """
    if strategy not in ("fsdp", "ddp"):
        raise ValueError(f"unknown strategy {strategy!r}: use fsdp or ddp")
    w = 1 if strategy == "ddp" else gpus
    t, n = batch * seq_len, c.layers
    r = residual or (4 if w == 1 else a)
    per_layer = activation_bytes_per_token_layer(c, a, r, fused_layer)
    terms = {
        "weights": 4 * c.student / w,
        "gradients": 4 * c.trainable / w,
        "adamw": 8 * c.trainable / w,
        "teacher": teacher_bytes * c.teacher / w,
        "gathered": a * c.root_student + (2 * a * c.block_student if w > 1 else 0),
        "reduce_scatter": 6 * c.block_trainable if w > 1 else 0,
        "optimizer_temp": 4 * c.trainable / w,
        "logits": t * c.vocab * 3 * a + 3 * 4 * min(t, KL_CHUNK) * c.vocab,
        "hidden": t * c.hidden * (a * (n + 1) + 8 * n),
        "activations": t * n * per_layer + a * c.binarized,
        "activations_checkpointed": t * n * r * c.hidden + t * per_layer + a * c.binarized // n,
        "last_block": t * per_layer + a * c.binarized // n,
        "teacher_cache": cache_tokens * (n + 2) * c.hidden * a,
    }
    kept = terms["weights"] + terms["adamw"] + terms["teacher"] + terms["teacher_cache"]
    grads_kept = terms["gradients"] if grad_accum > 1 or strategy == "ddp" else 0
    backward_starts = kept + grads_kept + terms["gathered"] + terms["logits"] + terms["hidden"]
    backward_ends = kept + terms["gradients"] + terms["gathered"] + terms["reduce_scatter"] + terms["last_block"]
    optimizer_step = kept + terms["gradients"] + terms["optimizer_temp"]
    peak = lambda activations: int(max(backward_starts + activations, backward_ends, optimizer_step))
    return {"terms": {k: int(v) for k, v in terms.items()},
            "total": peak(terms["activations"]), "total_checkpointed": peak(terms["activations_checkpointed"])}


def parse_bytes(text: str) -> int:
    """A GPU's memory as `pack.parse_size` reads sizes ('80GB', '80GiB', '141000MB'), a plain number being GB."""
    from .pack import parse_size

    try:
        return parse_size(f"{text}GB" if re.fullmatch(r"\s*[0-9.]+\s*", text) else text)
    except ValueError as err:
        raise ValueError(f"--gpu-memory: {err} (give e.g. 80GB or 80GiB)") from None


def plan(config_name: str, gpus: int, seq_len: int, batch: int, gpu_memory: int = 80 * GB,
         num_experts: int = 4, grad_accum: int = 1, strategy: str = "fsdp", cache_tokens: int = 0) -> dict:
    from .footprint import load_config

    if min(gpus, seq_len, batch, num_experts, grad_accum) < 1:
        raise ValueError("plan: --gpus, --seq-len, --batch, --grad-accum and --num-experts must be >= 1")
    if cache_tokens < 0 or (cache_tokens and gpus > 1):
        raise ValueError("plan: --cache-tokens must be >= 0, and the teacher cache is for one GPU "
                         "(train --cache-teacher)")
    counts = count(load_config(config_name), num_experts)
    result = estimate(counts, gpus, seq_len, batch, grad_accum=grad_accum, strategy=strategy,
                      cache_tokens=cache_tokens)
    cache_bytes, cache_on = result["terms"]["teacher_cache"], "device" if cache_tokens else None
    if cache_tokens and result["total"] > TRAIN_FIT_FRACTION * gpu_memory:  # as train.TeacherCache decides
        cache_on = "host"
        result = estimate(counts, gpus, seq_len, batch, grad_accum=grad_accum, strategy=strategy,
                          cache_tokens=2 * batch * grad_accum * seq_len)
    limit = FIT_FRACTION * gpu_memory
    return {"config": config_name, "gpus": gpus, "strategy": strategy, "seq_len": seq_len, "batch_per_gpu": batch,
            "grad_accum": grad_accum, "num_experts": num_experts, "cache_tokens": cache_tokens,
            "teacher_cache_on": cache_on, "host_memory_teacher_cache": cache_bytes if cache_on == "host" else 0,
            "gpu_memory": gpu_memory, "parameters": {
                "teacher": counts.teacher, "student": counts.student, "trainable": counts.trainable},
            **result, "fits": result["total"] <= limit, "fits_checkpointed": result["total_checkpointed"] <= limit,
            # rank 0 builds both models in host memory (fp32) before sharding them; the other ranks build
            # them on the meta device and receive their shards on the GPU (train.prepare, distributed.place)
            "host_memory_rank0_at_load": 4 * (counts.teacher + counts.student)}


def format_plan(p: dict) -> str:
    gb = lambda v: f"{v / GB:,.2f}"
    rows = [("student weights (fp32 master)", "weights"), ("gradients (fp32)", "gradients"),
            ("AdamW state (fp32 x2)", "adamw"), ("teacher (bf16, frozen)", "teacher"),
            ("gathered units (bf16)", "gathered"), ("a block's gradients in reduce-scatter (FSDP2)", "reduce_scatter"),
            ("AdamW step temporary (fp32)", "optimizer_temp"), ("logits and KL chunk", "logits"),
            ("hidden states (MSE term)", "hidden"), ("activations, no checkpointing", "activations"),
            ("activations, checkpointing", "activations_checkpointed"),
            ("the first block's activations at the end of backward", "last_block"),
            ("teacher cache (train --cache-teacher)" if p["teacher_cache_on"] != "host" else
             "teacher cache's window and landing buffers (the cache on the host)", "teacher_cache")]
    params = p["parameters"]
    sharing = f" ({p['strategy']})" if p["gpus"] > 1 else ""
    lines = [f"plan for {p['config']}: {p['gpus']} GPU(s){sharing}, {p['batch_per_gpu']} x {p['seq_len']} "
             f"tokens per GPU, grad-accum {p['grad_accum']}, "
             f"E={p['num_experts']}; teacher {params['teacher'] / 1e9:.2f}B parameters, "
             f"student trains {params['trainable'] / 1e9:.2f}B", "| per GPU | GB |", "|---|---:|"]
    lines += [f"| {label} | {gb(p['terms'][key])} |" for label, key in rows]
    limit = FIT_FRACTION * p["gpu_memory"]
    for label, key, fit in (("peak, gradient checkpointing", "total_checkpointed", "fits_checkpointed"),
                            ("peak, no checkpointing", "total", "fits")):
        verdict = "fits" if p[fit] else "does NOT fit"
        lines.append(f"| **{label}** | **{gb(p[key])}** ({verdict} in {gb(limit)} = 90 % of {gb(p['gpu_memory'])}) |")
    lines.append("peak: the largest of backward's start, backward's end and the optimizer step (not every term "
                 "above is alive at once; plan.py)")
    lines.append(f"host memory while loading: {gb(p['host_memory_rank0_at_load'])} GB on rank 0 (the other ranks: "
                 "their shards only, on the GPU)")
    if p["teacher_cache_on"] == "host":
        lines.append(f"teacher cache: {gb(p['host_memory_teacher_cache'])} GB of page-locked host memory (train keeps "
                     "it there since it does not fit the GPU beside the run, and needs it within half the host's "
                     "free memory)")
    return "\n".join(lines)
