"""Perplexity by the field's protocol (see data.eval_windows)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import eval_windows, leading_bos


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window, float64, shape (N,)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
        out.append(nll.double().cpu())
    return torch.cat(out)


def perplexity(model, tokenizer, dataset: str = "wikitext2", seq_len: int = 2048,
               max_windows: int | None = None, data_dir=None, batch_size: int = 1) -> float:
    """exp(mean NLL) over the non-overlapping windows of ``dataset`` (wikitext2 or c4), each starting
    with the BOS for models that need it (data.needs_bos)."""
    was_training = model.training
    model.eval()
    try:
        windows = eval_windows(tokenizer, dataset, seq_len, data_dir, max_windows,
                               leading_bos(model.config, tokenizer))
        return math.exp(window_nll(model, windows, batch_size).mean().item())
    finally:
        model.train(was_training)
