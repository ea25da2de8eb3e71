"""`binarymos analyze RUN --out DIR`: the paper's pictures of a trained run, as PNG files.

    gates.png    per-token gating scores G = softmax(x W_R) of the chosen layers over a sentence (after the
                 BOS for models that need one, data.needs_bos)
    scales.png   per-token scales s_in / s_out of those layers against the static scale (the mean of
                 the experts: what one expert, OneBit, would hold), for the channels that move most
    loss.png     the loss terms of RUN/log.jsonl against trained tokens, the block-wise phase shaded
    analyze.json the numbers behind the pictures, and every binarized layer's expert spread (expert_spread)

matplotlib is imported only here (pip install 'binarymos[plot]'); ``plots=False`` (--no-plots) writes
analyze.json alone and needs none.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch

from .convert import binarized_layers, decoder_blocks
from .data import leading_bos
from .nn import BinarizedExperts, BinaryMoSLinear

DEFAULT_TEXT = "The capital of France is Paris, a city known for its art, its food and the Eiffel Tower."
CHANNELS = 24  # channels drawn per scale panel: those whose per-token scale varies most
MAX_TOKENS = 64  # of the sentence: more would not be legible as labels


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("analyze needs matplotlib: pip install 'binarymos[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def choose_layers(model, layers: str | None) -> dict[str, BinaryMoSLinear]:
    """Name -> layer. ``layers``: comma-separated block indices (each block's first binarized layer) or
    fnmatch patterns of layer names; default: the first binarized layer of the first, middle and last block.
    A mixture's expert layers are left out: each sees only the tokens routed to it, not the text's."""
    routed = {id(layer) for m in model.modules() if isinstance(m, BinarizedExperts) for layer in m.layers()}
    every = {n: m for n, m in binarized_layers(model).items() if isinstance(m, BinaryMoSLinear)}
    found = {n: m for n, m in every.items() if id(m) not in routed}
    if not found:
        raise ValueError("analyze: the model has no BinaryMoS layers (a sign baseline or a full-precision model?)")
    blocks_name, blocks = decoder_blocks(model)
    items = _csv_items(layers) if layers else [str(i) for i in sorted({0, len(blocks) // 2, len(blocks) - 1})]
    chosen = {}
    for item in items:
        if item.lstrip("-").isdigit():
            if not -len(blocks) <= int(item) < len(blocks):
                raise ValueError(f"analyze: block {item} out of range (the model has {len(blocks)})")
            prefix = f"{blocks_name}.{int(item) % len(blocks)}."
            names = [n for n in found if n.startswith(prefix)][:1]
        else:
            names = [n for n in found if fnmatch.fnmatch(n, item)]
        if not names and any(fnmatch.fnmatch(n, item) for n in every):
            raise ValueError(f"analyze: {item!r} names layers of a mixture's experts, which see only the tokens "
                             "routed to them; choose attention or dense layers")
        if not names:
            raise ValueError(f"analyze: no BinaryMoS layer matches {item!r}")
        chosen.update({n: found[n] for n in names})
    return chosen


def _csv_items(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@torch.no_grad()
def layer_inputs(model, layers: dict[str, BinaryMoSLinear], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input (tokens x in) each chosen layer sees when the model reads ``ids``."""
    seen, hooks = {}, []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0][0])))
    try:
        model(input_ids=ids.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def expert_spread(model) -> dict[str, float]:
    """How far apart each binarized layer's experts are: the mean over channels of the scales' std over the experts,
    over the mean |scale| of the layer (scale_in's and scale_out's channels together; per channel, a mean near zero
    would blow the ratio up). 0 where the experts are equal, as the paper initialises them (--expert-init-noise
    spreads them); OneBit's single expert has no spread and is left out."""
    spread = {}
    for name, layer in binarized_layers(model).items():
        if isinstance(layer, BinaryMoSLinear) and layer.num_experts > 1:
            s = torch.cat([layer.scale_in.detach().float(), layer.scale_out.detach().float()], dim=1)
            spread[name] = (s.std(0).mean() / s.abs().mean().clamp_min(1e-30)).item()
    return spread


def _token_labels(tokenizer, ids: list[int]) -> list[str]:
    return [repr(tokenizer.decode([i]))[1:-1] for i in ids]


def plot_gates(plt, gates: dict[str, torch.Tensor], labels: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(gates), 1, figsize=(min(24, max(8, 0.35 * len(labels))), 1.0 + sum(
        0.9 + 0.25 * g.shape[1] for g in gates.values())), squeeze=False)
    for ax, (name, g) in zip(axes[:, 0], gates.items()):
        im = ax.imshow(g.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(g.shape[1]), [f"expert {e}" for e in range(g.shape[1])], fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle("gating scores per token", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scales(plt, scales: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(len(scales), 2, figsize=(13, 3.2 * len(scales)), squeeze=False)
    for row, (name, sides) in zip(axes, scales.items()):
        for ax, (side, (per_token, static)) in zip(row, sides.items()):
            ratio = per_token / static
            top = (ratio - 1).abs().mean(0).argsort(descending=True)[:CHANNELS].sort().values
            ax.boxplot(ratio[:, top].numpy(), whis=(0, 100))
            ax.axhline(1.0, color="red", lw=1, label="static scale (mean of the experts)")
            ax.set_xticks(range(1, len(top) + 1), [str(c) for c in top.tolist()], rotation=90, fontsize=7)
            ax.set_xlabel(f"channel (the {len(top)} most token-dependent)", fontsize=8)
            ax.set_ylabel("per-token scale / static", fontsize=8)
            ax.set_title(f"{name}: {side} over the sentence's tokens", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _counted(records: list[dict]) -> list[dict]:
    """The records that say how many tokens were trained (a line edited by hand or by another tool may not)."""
    return [r for r in records if _numeric(r.get("tokens"))]


def blockwise_phase(records: list[dict]) -> tuple[int, int]:
    """(tokens, tokens): where a run's block-wise phase ends while its blocks take the teacher's inputs alone, and
    where it ends with its --blockwise-anneal; (0, 0) for a run without one."""
    phase = [r for r in _counted(records) if r.get("blockwise")]
    forced_until = max((r["tokens"] for r in phase if r.get("teacher_share", 1.0) >= 1.0), default=0)
    return forced_until, phase[-1]["tokens"] if phase else 0


def plot_loss(plt, records: list[dict], path: Path) -> None:
    """The loss terms against trained tokens, the block-wise phase shaded (its terms are each block's own error, so
    the curves jump where it ends), the part of it where the teacher's share of the inputs falls (--blockwise-anneal)
    lighter. Draws nothing for records without these terms (a log.jsonl that is not train's)."""
    records = _counted(records)
    keys = [k for k in ("loss", "kl", "hidden") if any(_numeric(r.get(k)) for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    tokens = [r["tokens"] for r in records]
    forced_until, blockwise_until = blockwise_phase(records)
    for ax, key in zip(axes[0], keys):
        if forced_until:
            ax.axvspan(0, forced_until, color="tab:orange", alpha=0.15, label="block-wise")
        if blockwise_until > forced_until:
            ax.axvspan(forced_until, blockwise_until, color="tab:orange", alpha=0.06, label="annealed")
        if blockwise_until:
            ax.legend(loc="upper right", fontsize=8)
        ax.plot(tokens, [r[key] if _numeric(r.get(key)) else math.nan for r in records])
        ax.set_yscale("log")
        ax.set_xlabel("trained tokens")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def analyze(run: str | Path, out: str | Path, layers: str | None = None, text: str = DEFAULT_TEXT,
            plots: bool = True) -> dict:
    """Draw gates.png, scales.png and (when RUN has a log) loss.png into ``out`` (not with plots False); returns
    analyze.json's content."""
    from .models import load_model
    from .train import read_log, run_model, run_of

    if not text.strip():  # before the model is loaded
        raise ValueError("analyze: --text is empty: give a sentence to route, or leave --text out")
    plt = _pyplot() if plots else None
    model_dir = run_model(run)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"analyze: {run} is neither a run directory nor a trained model directory")
    model, tokenizer = load_model(str(model_dir))
    chosen = choose_layers(model, layers)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not text_ids:
        raise ValueError("analyze: --text is empty")
    bos = leading_bos(model.config, tokenizer)  # as in training (Gemma: <bos> first), labelled like the text
    ids = torch.tensor(([] if bos is None else [bos]) + text_ids)[:MAX_TOKENS]
    inputs = layer_inputs(model, chosen, ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _token_labels(tokenizer, ids.tolist())
    gates = {n: layer.gates(inputs[n]).float() for n, layer in chosen.items()}
    scales = {}
    for name, layer in chosen.items():
        s_in, s_out = layer.token_scales(inputs[name])
        scales[name] = {"s_in": (s_in.float().expand(len(ids), -1), layer.scale_in.float().mean(0)),
                        "s_out": (s_out.float().expand(len(ids), -1), layer.scale_out.float().mean(0))}
    if plots:
        plot_gates(plt, gates, labels, out / "gates.png")
        plot_scales(plt, scales, out / "scales.png")
    spread = expert_spread(model)
    summary = {"text": text, "tokens": labels, "gates": {n: g.tolist() for n, g in gates.items()},
               "relative_spread": {n: {side: ((v - static).abs().mean() / static.abs().mean()).item()
                                       for side, (v, static) in sides.items()} for n, sides in scales.items()},
               "expert_spread": spread, "expert_spread_mean": sum(spread.values()) / len(spread) if spread else 0.0}
    records = read_log(run_of(run) or run)
    if records:
        if plots:
            plot_loss(plt, records, out / "loss.png")
        summary["log_records"] = len(records)
        blockwise_until = blockwise_phase(records)[1]
        if blockwise_until:
            summary["blockwise_until_tokens"] = blockwise_until
    (out / "analyze.json").write_text(json.dumps(summary, indent=2))
    return summary
