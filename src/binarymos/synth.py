"""Training text sampled from the teacher itself (as OneBit and LLM-QAT did), cached on disk.

Real text runs out (about 1.3 M tokens offline); the teacher can write as much as the budget asks.
Each sequence starts with a token drawn uniformly from the vocabulary (special tokens excluded),
or with a window of real text (``prompts``: the teacher then continues real text, which keeps its
writing near the text the evaluation measures), and continues with tokens sampled from
softmax(logits / temperature); temperature 0 is greedy. For models that need a BOS at the start of
their input (Gemma, data.needs_bos) that BOS comes first.

All randomness comes from one table of uniforms, ``torch.rand(count, seq_len)`` of a CPU generator
seeded with ``seed``: column 0 picks the drawn first token, column t the token at position t by
inverse CDF (columns of the BOS and of a prompt go unused). So sequence i depends on (model, seed,
temperature, length, its prompt) only, not on the batch it was generated in, and a plain loop can
reproduce it (tests/test_synth.py does).

``--data teacher`` trains on these sequences alone; ``--data teacher+c4_wiki`` adds real text.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import DataError, cut_rows, leading_bos
from .models import _cache_dir, kv_cache_keyword, resolve, returned_kv_cache

TEACHER = "teacher"


def split_data(name: str) -> tuple[str, bool]:
    """("c4_wiki", True) for "teacher+c4_wiki": the real sources, and whether teacher text is wanted."""
    parts = name.split("+")
    real = [p for p in parts if p != TEACHER]
    if not all(parts) or len(parts) - len(real) > 1:
        raise DataError(f"bad data {name!r}: use SOURCE, teacher, or teacher+SOURCE")
    return ",".join(real), len(real) < len(parts)


def first_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """The ids a sequence may start with: the tokenizer's, less its special tokens, within the model's vocabulary."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(len(tokenizer), vocab_size)) if i not in special])


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the first id whose cumulative probability exceeds u."""
    cdf = probs.cumsum(-1)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).to(cdf.dtype))
    return ids.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _dynamic_cache_steps(model, first_ids: torch.Tensor, seq_len: int):
    """Yields the last-position logits of each step of a plain KV-cached decoding; ``send`` it the next ids."""
    ids, cache, cache_keyword = first_ids, None, kv_cache_keyword(model)
    for _ in range(first_ids.shape[1], seq_len):
        result = model(input_ids=ids, **{cache_keyword: cache}, use_cache=True)
        cache = returned_kv_cache(result)
        ids = yield result.logits[:, -1].float()


def _static_cache_steps(model, first_ids: torch.Tensor, seq_len: int, graph: bool):
    """As _dynamic_cache_steps, with a preallocated (static) KV cache, so that every step after the first has one
    shape and one set of buffers; with ``graph`` (CUDA) those steps replay one captured CUDA graph.

    A decoding step of a small model is launch-bound (~1000 kernels of a few microseconds each), which a graph
    replay removes: SmolLM2-135M on an H100 wrote 10.8k tokens/s against 1.6k with the same cache eagerly (64 x 128
    tokens) and the same text at temperature 0 (benchmarks/sampling_speed.py, docs/RESULTS.md). Every step attends
    over the whole preallocated length, though, so long sequences stay slow (3.8k tokens/s at 256 x 2048). The 2-D
    attention mask marks the filled positions of the cache, so transformers masks the cache's empty tail.
    """
    from transformers import StaticCache

    batch, start = first_ids.shape
    device = first_ids.device
    cache = StaticCache(config=model.config, max_cache_len=seq_len)
    positions = torch.arange(seq_len, device=device)
    ids, pos = torch.empty(batch, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)
    mask = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    cache_keyword = kv_cache_keyword(model)

    def step(kv_cache):
        mask.copy_((positions <= pos).expand(batch, -1))
        return model(input_ids=ids, attention_mask=mask, cache_position=pos, **{cache_keyword: kv_cache},
                     use_cache=True).logits[:, -1].float()

    mask[:, :start] = 1
    ids.copy_((yield model(input_ids=first_ids, attention_mask=mask, cache_position=positions[:start],
                           **{cache_keyword: cache}, use_cache=True).logits[:, -1].float()))
    if graph:  # warm-up on a side stream, as torch.cuda.graph asks, then capture (which runs nothing)
        # The cache writes each step at its own counter, advanced by every forward (transformers' StaticLayer), not
        # at cache_position: the warm-up's forwards go to a scratch cache, so the text's counter stays at `start`.
        pos.fill_(start)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            scratch = StaticCache(config=model.config, max_cache_len=seq_len)
            for _ in range(2):
                step(scratch)
        torch.cuda.current_stream().wait_stream(stream)
        del scratch
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            logits = step(cache)
    for t in range(start, seq_len - 1):
        pos.fill_(t)
        if graph:
            captured.replay()
        else:
            logits = step(cache)
        ids.copy_((yield logits))


def prompt_windows(blocks: torch.Tensor, count: int, length: int, seed: int = 0,
                   bos_token_id: int | None = None) -> torch.Tensor:
    """(count, length) windows of real text for the teacher to continue: each from a seeded random block
    (rows of ``blocks``, as data.token_blocks cuts them) at a seeded random offset past the block's BOS."""
    first = 0 if bos_token_id is None else 1
    if not 1 <= length <= blocks.shape[1] - first:
        raise DataError(f"a prompt of {length} tokens does not fit in blocks of {blocks.shape[1] - first} "
                        "tokens of text")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(blocks), (count, 1), generator=generator)
    offsets = torch.randint(first, blocks.shape[1] - length + 1, (count, 1), generator=generator)
    return blocks[rows, offsets + torch.arange(length)]


@torch.no_grad()
def sample(model, tokenizer, count: int, seq_len: int, temperature: float = 1.0, seed: int = 0,
           batch_size: int = 64, cache: str | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """(count, seq_len) token ids written by ``model``, batch by batch on its device, with a KV cache.

    ``cache``: "dynamic" (transformers' default cache), "static", or "graph" (static, each step a CUDA graph
    replay, captured once per batch); None: "graph" on a GPU, "dynamic" elsewhere.
    ``prompts``: (count, P) ids each sequence starts with (after the BOS) instead of one drawn token.
    """
    if count < 1 or seq_len < 2 or temperature < 0 or batch_size < 1:
        raise ValueError("teacher text needs count >= 1, seq_len >= 2, temperature >= 0 and batch size >= 1")
    bos = leading_bos(model.config, tokenizer)
    if prompts is not None and (len(prompts) != count or prompts.shape[1] + (bos is not None) >= seq_len):
        raise ValueError(f"prompts must be {count} rows shorter than the {seq_len}-token sequences, "
                         f"got {tuple(prompts.shape)}")
    device = next(model.parameters()).device
    cache = cache or ("graph" if device.type == "cuda" else "dynamic")
    if cache not in ("dynamic", "static", "graph"):
        raise ValueError(f"cache must be dynamic, static or graph, got {cache!r}")
    uniforms = torch.rand(count, seq_len, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    starts = first_token_ids(tokenizer, model.config.get_text_config().vocab_size)
    out = torch.empty(count, seq_len, dtype=torch.long)
    was_training = model.training
    model.eval()
    # not cuDNN's attention: with the key length growing every step it took ~0.9 ms of host time per call,
    # half the host time of a decoding step (torch 2.11, H100; docs/RESULTS.md)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for lo in range(0, count, batch_size):
            u = uniforms[lo:lo + batch_size].to(device)
            ids = (starts.to(device)[(u[:, 0] * len(starts)).long()].unsqueeze(1) if prompts is None
                   else prompts[lo:lo + batch_size].to(device))
            if bos is not None:
                ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], 1)
            seqs = [ids]
            steps = (_dynamic_cache_steps(model, ids, seq_len) if cache == "dynamic"
                     else _static_cache_steps(model, ids, seq_len, graph=cache == "graph"))
            logits = next(steps)
            for t in range(ids.shape[1], seq_len):
                if temperature == 0:
                    ids = logits.argmax(-1, keepdim=True)
                else:
                    ids = pick(torch.softmax(logits / temperature, -1), u[:, t]).unsqueeze(1)
                seqs.append(ids)
                if t < seq_len - 1:
                    logits = steps.send(ids)
            out[lo:lo + batch_size] = torch.cat(seqs, 1).cpu()
    model.train(was_training)
    return out


def cache_path(model_name: str, count: int, seq_len: int, temperature: float, seed: int, dtype: torch.dtype,
               bos_token_id: int | None = None, prompts: torch.Tensor | None = None) -> Path:
    """Where the sequences of one setting live: $BINARYMOS_CACHE/teacher/<model>-<hash of the setting>.pt.

    The key holds the leading BOS and the prompts (a digest of their ids) only where there are some, so that
    the caches written before either existed stay valid for the settings they were written for.
    """
    source = resolve(model_name)
    key = {"model": str(Path(source).resolve()) if isinstance(source, Path) else source, "count": count,
           "seq_len": seq_len, "temperature": float(temperature), "seed": seed, "dtype": str(dtype), "version": 1}
    if bos_token_id is not None:
        key["bos"] = bos_token_id
    if prompts is not None:
        key["prompts"] = hashlib.sha1(prompts.to(torch.int64).numpy().tobytes()).hexdigest()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_dir() / "teacher" / f"{Path(str(model_name)).name}-{digest}.pt"


def teacher_tokens(model, tokenizer, model_name: str, count: int, seq_len: int, temperature: float = 1.0,
                   seed: int = 0, batch_size: int = 64, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """``sample``'s sequences, read from the cache when this setting was generated before, else generated and cached.

    The cache file is written to a temporary name and renamed, so a killed or concurrent run never
    leaves a torn file. The key includes the model's dtype (bf16 on a GPU samples other text than fp32).
    """
    dtype = next(model.parameters()).dtype
    path = cache_path(model_name, count, seq_len, temperature, seed, dtype, leading_bos(model.config, tokenizer),
                      prompts)
    if path.exists():
        return torch.load(path, weights_only=True)["ids"].long()
    ids = sample(model, tokenizer, count, seq_len, temperature, seed, batch_size, prompts=prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ids": ids.to(torch.int32), "model": model_name, "temperature": temperature, "seed": seed}, tmp)
    os.replace(tmp, path)
    return ids


def as_blocks(ids: torch.Tensor, seq_len: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Generated sequences as (N, seq_len) training blocks, cut from their concatenation as real text is
    (data.cut_rows; the teacher then sees the same joined context the student does). With ``bos_token_id``
    (which ``sample`` put at the start of every sequence) the stream leaves it out and each block starts with
    it, so sequences of length seq_len come back as they are."""
    stream = ids if bos_token_id is None else ids[:, 1:]
    blocks = cut_rows(stream.flatten().tolist(), seq_len, bos_token_id)
    if len(blocks) == 0:
        raise DataError(f"only {stream.numel()} teacher tokens: not one block of {seq_len}")
    return blocks
