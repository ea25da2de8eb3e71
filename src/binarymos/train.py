"""Distillation of a binarized student from its frozen full-precision teacher.

    loss = kl_weight * KL(p_teacher || p_student) + hidden_weight * hidden-state MSE over decoder layers

With ``blockwise`` > 0 the first part of the budget feeds every student block the teacher's input to that
block (TeacherForcedBlocks): the hidden-state terms are then each block's own error.

Recipes fill in what the user did not set: ``paper`` is the authors' setting (KL ``batchmean``,
lambda 10 on unnormalised MSE, AdamW lr 2e-5, cosine, 3 % warm-up); ``default`` is ours, tuned
for small budgets, its first quarter block-wise (docs/RESULTS.md says how it was measured).

A run directory holds ``train_config.json``, ``log.jsonl`` (one line per logged step),
``checkpoint.pt`` (written atomically every ``save_every`` steps, and when the process gets SIGTERM;
``resume=True`` continues from it bit-for-bit) and, at the end, ``model/`` (the trained binarized
model, loadable with ``binarymos.models.load_model``).

A budget is tokens, steps, epochs or minutes of training (``max_minutes``: the loop's own wall time,
model loading and evaluation excluded; the learning-rate schedule then runs over that time, and a
resumed run continues the clock).
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import os
import signal
import threading
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import distributed
from .convert import BinaryMoSConfig, binarize, decoder_blocks
from .data import DEFAULT_DATA, DataError, documents, leading_bos, token_blocks
from .kernels import triton_available
from .models import DEFAULT_MODEL, load_model, move_into_place
from .nn import BinarizedExperts, BinaryMoSLinear
from .synth import as_blocks, prompt_windows, split_data, teacher_tokens

RECIPES = {
    "default": dict(lr_weight=2e-4, lr_scale=1e-2, kl_reduction="token", hidden_weight=3.0,
                    hidden_norm="teacher", warmup=0.03, weight_decay=0.0, batch_size=8, blockwise=0.25),
    "paper": dict(lr_weight=2e-5, lr_scale=2e-5, kl_reduction="batchmean", hidden_weight=10.0,
                  hidden_norm="none", warmup=0.03, weight_decay=0.0, batch_size=4, blockwise=0.0),
}
# The default recipe's batch where each step replays as a CUDA graph. With the host's launches off the step's path,
# batch 4 beat batch 8 by 11 % at equal time (SmolLM2, 4 minutes, session 24) and reached 43.6 in 20 minutes (session
# 25); in eager steps the launches bound the step and batch 8 won (session 5).
DEFAULT_GRAPHED_BATCH_SIZE = 4


STRATEGIES = ("auto", "ddp", "fsdp")


class TrainingDivergedError(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """SIGTERM arrived (a job's time limit, `timeout`, a preemption): the run saved a checkpoint and stopped."""

    exit_code = 128 + signal.SIGTERM


COMPILE_SCOPES = ("none", "teacher", "all")


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    data_dir: str | None = None
    out: str = "runs/binarymos"
    method: str = "mos"
    num_experts: int = 4
    recipe: str = "default"
    seq_len: int = 2048
    batch_size: int | None = None  # sequences per micro-batch; None: the recipe's
    grad_accum: int = 1
    max_tokens: int | None = None  # training budget; with max_steps None and this None: `epochs` epochs
    max_steps: int | None = None
    max_minutes: float | None = None  # training-time budget: the schedule runs over minutes, not steps
    epochs: float = 1.0
    # None: taken from the recipe
    lr_weight: float | None = None  # latent weights
    lr_scale: float | None = None   # scaling experts, router, biases
    weight_decay: float | None = None
    warmup: float | None = None     # fraction of the steps (of the time, with max_minutes)
    kl_weight: float = 1.0
    hidden_weight: float | None = None
    kl_reduction: str | None = None  # "token": mean over tokens; "batchmean": sum / batch size
    hidden_norm: str | None = None   # "teacher": each layer's MSE over the teacher's mean square; "none"
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    save_every: int = 50
    grad_checkpointing: bool | None = None  # None: on a GPU, only where the planner says it is needed
    device: str | None = None
    resume: bool = False
    # teacher-written text (data "teacher" or "teacher+SOURCE"; binarymos.synth)
    teacher_samples: int = 1024
    teacher_seq_len: int | None = None  # None: seq_len
    teacher_temperature: float = 1.0
    teacher_batch_size: int = 64
    teacher_prompt_len: int = 0  # > 0: each sequence continues a window of this many real tokens (teacher+SOURCE)
    # recipe levers (defaults keep the measured recipe)
    train_norms: bool = False       # also train the norms' weights, at lr_scale
    router_init_std: float = 0.02
    expert_init_noise: float = 0.0  # relative std of each expert's initial scales (0: all equal, the paper's)
    ste_clip: float = 1.0           # the sign's straight-through gradient passes where |w| <= ste_clip
    # fraction of the budget trained block by block first: every student block computes from the teacher's
    # input to it (TeacherForcedBlocks), then end to end; None: the recipe's (default 0.25, paper 0)
    blockwise: float | None = None
    # fraction of the budget after the block-wise one over which each student block's input moves linearly from
    # the teacher's input to its own predecessor's output (TeacherForcedBlocks' teacher_share), so the end-to-end
    # phase does not start from the error of all blocks compounded at once; 0: end to end at once
    blockwise_anneal: float = 0.0
    # "teacher": torch.compile the frozen teacher's forward (one process on a GPU: with CUDA graphs), ~30 s to compile,
    # +13 % tokens/s at E=4 (SmolLM2, one H100, docs/RESULTS.md); "all": the student too (minutes to compile)
    compile: str = "none"
    # one process: the student's frozen parameters (embeddings, norms, head) in bf16, so that its activations
    # are bf16 as under FSDP2 (autocast narrows only the matmuls of float32 masters); measured +10-12 % tokens/s,
    # -32 % memory and perplexity within run-to-run noise (SmolLM2, batch 8, one 5-minute pair on an H100), opt-in
    # until a second pair confirms it
    bf16_compute: bool = False
    # one process on a GPU: each step's forward, backward and clipping replayed as a CUDA graph (GraphedStep), so
    # the host no longer launches its kernels one by one; needs compile none and no checkpointing
    cuda_graphs: bool = False
    # one process: the teacher's outputs for every training block computed once, before the first step, and kept on
    # the device (TeacherCache; where it has no room, in host memory), so no step runs the teacher; its seconds
    # count in the budget
    cache_teacher: bool = False
    # several processes (torchrun): "ddp" replicates both models on every rank, "fsdp" shards them; "auto": ddp
    # where the one-GPU plan fits the GPU (choose_strategy)
    strategy: str = "auto"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: use one of {', '.join(RECIPES)}")
        if self.batch_size is None and self.recipe == "default" and self.cuda_graphs:
            self.batch_size = DEFAULT_GRAPHED_BATCH_SIZE
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        rates = {"lr_weight": self.lr_weight, "lr_scale": self.lr_scale, "grad_clip": self.grad_clip}
        weights = {"weight_decay": self.weight_decay, "kl_weight": self.kl_weight, "hidden_weight": self.hidden_weight,
                   "router_init_std": self.router_init_std, "expert_init_noise": self.expert_init_noise}
        if not all(math.isfinite(v) and v > 0 for v in rates.values()) or \
                not all(math.isfinite(v) and v >= 0 for v in weights.values()) or not 0 <= self.warmup <= 1:
            raise ValueError(f"{', '.join(rates)} must be > 0, {', '.join(weights)} must be >= 0 (all finite), and "
                             f"warmup a fraction in [0, 1]; got {dict(rates, **weights, warmup=self.warmup)}")
        if self.kl_reduction not in ("token", "batchmean"):
            raise ValueError(f"kl_reduction must be 'token' or 'batchmean', got {self.kl_reduction!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.hidden_norm not in ("teacher", "none"):
            raise ValueError(f"hidden_norm must be 'teacher' or 'none', got {self.hidden_norm!r}")
        for key in ("seq_len", "batch_size", "grad_accum", "log_every", "save_every", "teacher_samples",
                    "teacher_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if sum(x is not None for x in (self.max_tokens, self.max_steps, self.max_minutes)) > 1:
            raise ValueError("give one budget: max_tokens, max_steps or max_minutes")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("max_minutes must be > 0")
        if any(budget is not None and budget < 1 for budget in (self.max_steps, self.max_tokens)) or self.epochs <= 0:
            raise ValueError("max_steps and max_tokens must be >= 1, and epochs > 0")
        if not (self.teacher_temperature >= 0 and self.ste_clip > 0) or (self.teacher_seq_len or 2) < 2:  # NaN too
            raise ValueError("teacher_temperature must be >= 0, ste_clip > 0 and teacher_seq_len >= 2")
        if self.teacher_prompt_len < 0:
            raise ValueError("teacher_prompt_len must be >= 0")
        if isinstance(self.compile, bool):  # configs written before compile took a scope
            self.compile = "all" if self.compile else "none"
        if self.compile not in COMPILE_SCOPES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_SCOPES)}, got {self.compile!r}")
        if not 0 <= self.blockwise <= 1:
            raise ValueError(f"blockwise must be a fraction of the budget in [0, 1], got {self.blockwise}")
        if self.blockwise_anneal < 0 or self.blockwise + self.blockwise_anneal > 1 or \
                (self.blockwise_anneal and not self.blockwise):
            raise ValueError("blockwise_anneal must be >= 0 and follow a block-wise phase (blockwise > 0) within the "
                             f"budget (blockwise + blockwise_anneal <= 1), got {self.blockwise} + "
                             f"{self.blockwise_anneal}")
        if self.blockwise and (not self.hidden_weight or self.compile != "none"):
            raise ValueError("blockwise training needs hidden_weight > 0 (its loss is the blocks' outputs) and "
                             "compile none (its hooks change each step's graph): set blockwise 0 for either")
        if self.cuda_graphs and (self.compile != "none" or self.grad_checkpointing):
            raise ValueError("cuda_graphs captures the eager step: it needs compile none and no gradient "
                             "checkpointing")
        if self.cache_teacher and self.compile == "teacher":
            raise ValueError("cache_teacher runs the teacher once, before training: compile 'teacher' has nothing "
                             "to compile")
        self.binarization()  # validates its fields

    def binarization(self) -> BinaryMoSConfig:
        """How the student is made from the teacher (after torch.manual_seed(seed), as prepare does it)."""
        return BinaryMoSConfig(num_experts=self.num_experts, method=self.method, router_init_std=self.router_init_std,
                               expert_init_noise=self.expert_init_noise)


# what a resumed run may set anew: where and how fast it runs, not what it trains (a changed batch_size or grad_accum
# keeps the global batch: distributed._keep_global_batch)
ANEW_ON_RESUME = frozenset({"out", "resume", "data_dir", "device", "log_every", "save_every", "grad_checkpointing",
                            "strategy", "compile", "batch_size", "grad_accum", "teacher_batch_size", "cuda_graphs",
                            "cache_teacher"})


def run_settings(out: str | os.PathLike) -> dict:
    """The settings the run in ``out`` was started with (its train_config.json), {} where it has none."""
    path = Path(out) / "train_config.json"
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a run's settings ({err})") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a run's settings (a JSON object of train options)")
    return settings


def run_model(path: str | os.PathLike) -> Path:
    """The model directory ``path`` names: a run directory's model/ (a directory that is no model itself and holds
    one in model/), else ``path``."""
    path = Path(path)
    is_run = (path / "model" / "config.json").is_file() and not (path / "config.json").is_file()
    return path / "model" if is_run else path


def run_of(path: str | os.PathLike) -> Path | None:
    """The run directory that trained the model ``path`` names (a run directory or its model/, also through a link
    or as "."), None for others."""
    for path in dict.fromkeys((Path(path), Path(path).resolve())):
        runs = [run for run in (path, path.parent) if path in (run, run / "model") and run_model(run) == run / "model"]
        if runs:
            return runs[0]
    return None


def read_log(out: str | os.PathLike) -> list[dict]:
    """The records of the run's log.jsonl, one per logged step in step order ([] without a log). A line that does
    not parse (the last one, when a kill cut its write short) is skipped; where a run killed without a checkpoint
    was resumed from an earlier one, the steps it trained again replace the ones the kill lost (a record without an
    integer step stays where it is)."""
    path = Path(out) / "log.jsonl"
    records: list[dict] = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        while records and isinstance(step, int) and isinstance(records[-1].get("step"), int) \
                and step <= records[-1]["step"]:
            records.pop()
        records.append(record)
    return records


def _ends_mid_line(path: Path) -> bool:
    """Whether the file's last byte is not a newline (a write a kill cut short); False for a missing or empty file."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def resume_settings(out: str | os.PathLike, given: dict) -> dict:
    """TrainConfig fields that continue the run in ``out``: the run's own settings with ``given`` (the options a
    command line sets) over them, so that `binarymos train --out RUN --resume` needs none of the options the run
    was started with. Settings of an older version that TrainConfig no longer has are dropped."""
    names = {f.name for f in fields(TrainConfig)}
    return {**{key: value for key, value in run_settings(out).items() if key in names}, **given,
            "out": str(out), "resume": True}


def check_resumable(cfg: TrainConfig) -> None:
    """A resumed run must train what it was started to train: every setting outside ANEW_ON_RESUME as saved."""
    saved = run_settings(cfg.out)
    if not saved:  # resuming would take every default, the model's too, and fail on the checkpoint or train another
        raise FileNotFoundError(f"--resume: {Path(cfg.out) / 'train_config.json'} is missing or empty, so the run's "
                                "settings are unknown")
    differ = [f"{key} {saved[key]!r} (given {value!r})" for key, value in asdict(cfg).items()
              if key not in ANEW_ON_RESUME and key in saved and saved[key] != value]
    if differ:
        raise ValueError(f"--resume: the run in {cfg.out} was started with {', '.join(differ)}; resume it with its own "
                         "settings (leave those options out) or train into another --out")


def _diverged(what: str, step: int, out: Path) -> TrainingDivergedError:
    found = distributed.latest_checkpoint(out)
    kept = found[0] if found else "none (no checkpoint was written yet)"
    return TrainingDivergedError(f"{what} at step {step}: training stopped before the update; "
                                 f"the last good checkpoint is {kept}")


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student), in float32.

    On a GPU with Triton: one pass over both models' logits forward and one backward (binarymos.kernels.training's
    KLSum). Elsewhere a chunk of tokens at a time, each chunk recomputed in the backward pass, so the float32
    vocabulary-sized tensors exist for one chunk only (a batch of 4 x 2048 tokens over a 49k vocabulary is 1.6 GB
    per copy). It draws no random numbers, so the generators' states are not saved (reading them is not allowed in a
    CUDA graph).
    """
    if student_logits.is_cuda and triton_available():
        from .kernels.training import kl_sum_triton

        return kl_sum_triton(student_logits, teacher_logits)
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    return sum(checkpoint(_kl_sum, s[i:i + chunk], t[i:i + chunk], use_reentrant=False, preserve_rng_state=False)
               for i in range(0, len(s), chunk))


def hidden_pair(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, by_teacher: bool) -> torch.Tensor:
    """One layer's hidden-state term: the float32 MSE, divided by the teacher's mean square when ``by_teacher``."""
    mse = F.mse_loss(student_hidden.float(), teacher_hidden.float())
    return mse / teacher_hidden.float().pow(2).mean() if by_teacher else mse


def distillation_loss(student_out, teacher_out, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher || student) over the vocabulary plus the per-layer hidden-state term: (loss, {"kl", "hidden"}),
    the parts as detached 0-d tensors (reading them is a wait for the GPU, which the loop does once a step)."""
    batch, seq = student_out.logits.shape[:2]
    kl = kl_sum(student_out.logits, teacher_out.logits) / (batch * seq if cfg.kl_reduction == "token" else batch)
    hidden = torch.zeros((), device=kl.device)
    if cfg.hidden_weight:
        pairs = list(zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]))
        for h_s, h_t in pairs:
            hidden = hidden + hidden_pair(h_s, h_t, cfg.hidden_norm == "teacher")
        if cfg.hidden_norm == "teacher":
            hidden = hidden / len(pairs)
    loss = cfg.kl_weight * kl + cfg.hidden_weight * hidden
    return loss, {"kl": kl.detach(), "hidden": hidden.detach()}


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # older transformers return (hidden, ...)


def _input_keeper(store, i):
    def keep(module, args, kwargs):
        store[i] = args[0] if args else kwargs["hidden_states"]
    return keep


def _output_keeper(store, i):
    def keep(module, args, output):
        store[i] = _block_output(output)
    return keep


def hook_blocks(model, inputs: dict, outputs: dict) -> list:
    """Hooks that keep each decoder block's input and output, by block index, while ``model`` runs: their handles."""
    handles = []
    for i, block in enumerate(decoder_blocks(model)[1]):
        handles += [block.register_forward_pre_hook(_input_keeper(inputs, i), with_kwargs=True),
                    block.register_forward_hook(_output_keeper(outputs, i))]
    return handles


class TeacherForcedBlocks:
    """Block-wise distillation, all blocks at once: while inside ``with``, each decoder block of the student
    computes from the teacher's input to that block instead of its own predecessor's output, so every block
    learns to reproduce its teacher block without the errors of the blocks before it (EfficientQAT's block-wise
    phase, trained in one pass). The hooks stay until the backward is done, because gradient checkpointing
    recomputes the blocks there. ``outputs`` gives the two models' block outputs as ``hidden_states[1:]``, the
    layout distillation_loss reads. With ``teacher_share`` (a 0-d tensor on the models' device, read when the blocks
    run, so a CUDA graph's replays see its new values) each block's input is lerp(own, teacher's, teacher_share)
    instead: the gradient then also reaches the blocks before it, through their share. With ``teacher`` None
    only the student is hooked, and the teacher's block inputs and outputs come from a TeacherCache (``outputs``).
    """

    def __init__(self, teacher, student, teacher_share: torch.Tensor | None = None):
        self.teacher_in, self.teacher_out, self.student_out = {}, {}, {}
        self._teacher, self._student = (None if teacher is None else distributed.unwrap(teacher),
                                        distributed.unwrap(student))
        self.teacher_share = teacher_share

    def __enter__(self):
        self._handles = []
        if self._teacher is not None:
            self._handles += hook_blocks(self._teacher, self.teacher_in, self.teacher_out)
        for i, s_block in enumerate(decoder_blocks(self._student)[1]):
            self._handles += [s_block.register_forward_pre_hook(self._replacer(i), with_kwargs=True),
                              s_block.register_forward_hook(_output_keeper(self.student_out, i))]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for store in (self.teacher_in, self.teacher_out, self.student_out):
            store.clear()  # the next micro-batch's forward must not find these still alive

    def _replacer(self, i):
        def replace_input(module, args, kwargs):
            own = args[0] if args else kwargs["hidden_states"]
            forced = self.teacher_in[i].to(own.dtype)
            if self.teacher_share is not None:
                forced = torch.lerp(own, forced, self.teacher_share.to(own.dtype))
            return ((forced, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": forced})
        return replace_input

    def outputs(self, student_out, teacher_out):
        """(student, teacher) outputs whose hidden_states[1:] are the blocks' outputs, in block order."""
        blocks = range(len(self.teacher_out))
        return tuple(SimpleNamespace(logits=out.logits, hidden_states=[None] + [store[i] for i in blocks])
                     for out, store in ((student_out, self.student_out), (teacher_out, self.teacher_out)))


class TeacherCache:
    """The frozen teacher's outputs for every training block, computed once and kept on the device, so that a step
    runs no teacher forward: each decoder block's input and output (the block-wise phase), the hidden states (end
    to end) and the output head's input, from which a step recomputes the logits with the head (one product; the
    logits themselves would be vocabulary-sized: 61 GB as bf16 for SmolLM2's 303 blocks of 2048 tokens, against 23
    GB for these). Tensors that are one and the same in the forward (a block's output and the next block's input)
    are kept once. Exact, since the training data is whole blocks and the teacher is frozen in eval mode (up to the
    rounding of products that cuBLAS computes another way for the build's short last batch); a step's
    batch is then its block indices on the device, gathered inside a CUDA graph as well. ``fits(bytes)`` says
    whether the cache, of those bytes, may be allocated on the device; it is asked once the first blocks show its
    size.

    Where it does not fit but ``host_fits(bytes)`` says yes, the cache stays in host memory (pinned, on a GPU) and
    the device holds a window of one step's blocks (``on_host``): ``batches`` copies a step's blocks into the window
    and gives the step their positions in it, and ``prefetch``, called while a step runs, copies the next step's
    blocks over PCIe on a stream of their own, so that the step after finds them on the device. All the real text
    of SmolLM2 takes 48.8 GB, which an H100 cannot hold beside the run but its host can."""

    def __init__(self, teacher, blocks: torch.Tensor, batch_size: int, autocast, fits=lambda nbytes: True,
                 host_fits=lambda nbytes: False):
        device = next(teacher.parameters()).device
        self.ids, self.head = blocks.to(device), teacher.get_output_embeddings()
        self.roles, self.tensors, self.nbytes, self.on_host = None, [], 0, False
        block_in, block_out, head_in = {}, {}, {}
        handles = hook_blocks(teacher, block_in, block_out) + [self.head.register_forward_pre_hook(
            lambda module, args: head_in.update(x=args[0]))]
        try:
            for start in range(0, len(blocks), batch_size):
                with torch.no_grad(), autocast:
                    out = teacher(input_ids=self.ids[start:start + batch_size], output_hidden_states=True)
                named = {**{("in", i): t for i, t in block_in.items()}, **{("out", i): t for i, t in block_out.items()},
                         **{("hidden", j): t for j, t in enumerate(out.hidden_states) if j}, ("head",): head_in["x"]}
                tensors, roles = {}, {}
                for role, t in named.items():  # one entry per distinct tensor of the forward
                    roles[role] = tensors.setdefault((t.data_ptr(), t.shape, t.stride()), (len(tensors), t))[0]
                if self.roles is None:
                    self._allocate(roles, [t for _, t in tensors.values()], len(blocks), out.logits,
                                   teacher.config.get_text_config(), autocast, fits, host_fits)
                elif roles != self.roles:
                    raise RuntimeError("cache_teacher: the teacher's forward kept different tensors for other blocks")
                for index, t in tensors.values():
                    self._stored[index + 1][start:start + len(t)] = t
        finally:
            for handle in handles:
                handle.remove()
        if self.on_host:  # the window and the landing buffers: made at the first step, which shows their size
            self._stored[0] = blocks.cpu().pin_memory() if device.type == "cuda" else blocks.cpu().clone()
            self.ids, self.tensors, self._landing, self._landed = None, [], None, None
            self._copier = torch.cuda.Stream(device) if device.type == "cuda" else None
            self._window_read, self._landing_full = ((torch.cuda.Event(), torch.cuda.Event())
                                                     if self._copier is not None else (None, None))

    def _allocate(self, roles: dict, first: list[torch.Tensor], count: int, logits: torch.Tensor, config,
                  autocast, fits, host_fits) -> None:
        with torch.no_grad(), autocast:  # the first sequence's logits again, from the head alone
            recomputed = self.head(first[roles[("head",)]][:1]).float()
        capped = bool(getattr(config, "final_logit_softcapping", None)) or \
            any(getattr(config, key, None) not in (None, 1) for key in ("logit_scale", "logits_scaling"))
        if capped or (recomputed - logits[:1].float()).abs().max() > 1e-3 * logits[:1].float().abs().max():
            raise ValueError("cache_teacher: this model's logits are not its output head's output (a final "
                             "soft-capping or scaling), so they cannot be recomputed from the cache; train without it")
        nbytes = sum(t[0].numel() * t.element_size() for t in first) * count
        self.on_host = not fits(nbytes)
        if self.on_host and not host_fits(nbytes):
            raise ValueError(f"cache_teacher: the teacher's outputs for {count} blocks take {nbytes / 1e9:.1f} GB, "
                             "more than the device holds beside the run (or half the host's free memory); train "
                             "without cache_teacher")
        self.roles, self.nbytes = roles, nbytes
        shapes = [((count, *t.shape[1:]), t.dtype) for t in first]
        self.tensors = (self._host_tensors(shapes, pin=first[0].is_cuda) if self.on_host else
                        [torch.empty(shape, dtype=dtype, device=first[0].device) for shape, dtype in shapes])
        self._stored = [self.ids, *self.tensors]  # what the build fills: token ids first, then the roles' tensors

    def _host_tensors(self, shapes: list, pin: bool) -> list[torch.Tensor]:
        """Host tensors of these (shape, dtype)s in one buffer, page-locked for the GPU's copies with pin. Pinned
        through cudaHostRegister rather than pin_memory, whose allocator rounds each size up to a power of two
        (64 GB for SmolLM2's 48.8)."""
        sizes = [-(-math.prod(shape) * dtype.itemsize // 256) * 256 for shape, dtype in shapes]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        if pin:
            cudart = torch.cuda.cudart()
            if int(cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), 0)) != 0:
                raise RuntimeError(f"cache_teacher: {flat.numel() / 1e9:.1f} GB of host memory could not be "
                                   "page-locked for the GPU; train without cache_teacher")
            weakref.finalize(self, cudart.cudaHostUnregister, flat.data_ptr())
        offsets = [0, *itertools.accumulate(sizes)]
        return [flat[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for start, (shape, dtype) in zip(offsets, shapes)]

    def batches(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """A step's micro-batches as the step reads them from the cache: their block indices on the device or, with
        the cache on the host, their blocks copied into the device's window (from the landing buffers where
        ``prefetch`` brought them) and their positions there."""
        if not self.on_host:
            return [index.to(self.head.weight.device) for index in indices]
        rows = torch.cat(indices)
        if self._landing is None:  # the first step: a window and landing buffers of its size, for the whole run
            self.ids, *self.tensors = [t.new_empty((len(rows), *t.shape[1:]), device=self.head.weight.device)
                                       for t in self._stored]
            self._landing = [torch.empty_like(t) for t in (self.ids, *self.tensors)]
        elif len(rows) != len(self.ids):
            raise RuntimeError(f"cache_teacher: a step of {len(rows)} blocks, the window holds {len(self.ids)}")
        if self._landed is not None and torch.equal(self._landed, rows):
            torch.cuda.current_stream().wait_event(self._landing_full)
            for window, landed in zip((self.ids, *self.tensors), self._landing):
                window.copy_(landed)
        else:
            self._fill((self.ids, *self.tensors), rows)
        if self._copier is not None:
            self._window_read.record()  # the landing buffers are free once their rows are in the window
        self._landed = None
        ends = torch.tensor([len(index) for index in indices]).cumsum(0).tolist()
        return [torch.arange(end - len(index), end, device=self.ids.device) for end, index in zip(ends, indices)]

    def prefetch(self, indices: list[torch.Tensor]) -> None:
        """With the cache on the host and a GPU: start copying the blocks of the next step's ``indices`` to the
        landing buffers, on a stream of their own, while the current step runs."""
        if not self.on_host or self._copier is None or self._landing is None:
            return
        rows = torch.cat(indices)
        with torch.cuda.stream(self._copier):
            self._copier.wait_event(self._window_read)
            self._fill(self._landing, rows)
            self._landing_full.record()
        self._landed = rows

    def _fill(self, targets, rows: torch.Tensor) -> None:
        rows = rows.tolist()
        for target, stored in zip(targets, self._stored):
            for i, row in enumerate(rows):
                target[i].copy_(stored[row], non_blocking=True)

    def outputs(self, index: torch.Tensor, hidden_states: bool, forced: TeacherForcedBlocks | None):
        """(token ids, teacher output) of the blocks ``index`` (on the device), the output's hidden states only if
        asked; with ``forced``, its teacher block inputs and outputs are filled in. Run under the step's autocast, as
        the teacher's forward would be."""
        def pick(role):
            return self.tensors[self.roles[role]].index_select(0, index)

        hidden = [pick(role) for role in sorted(r for r in self.roles if r[0] == "hidden")] if hidden_states else []
        if forced is not None:
            for role in self.roles:
                if role[0] in ("in", "out"):
                    (forced.teacher_in if role[0] == "in" else forced.teacher_out)[role[1]] = pick(role)
        return self.ids.index_select(0, index), SimpleNamespace(logits=self.head(pick(("head",))),
                                                                 hidden_states=[None] + hidden)


def step_gradients(teacher, student, batches: list[torch.Tensor], cfg: TrainConfig, blockwise: bool, autocast,
                   ddp: bool = False, teacher_share: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches (``batches``: their token ids, on the device; with a
    TeacherCache for ``teacher``, their block indices), then the gradients clipped to cfg.grad_clip: [loss, kl,
    hidden, gradient norm] as one float32 tensor on the device, not yet read. With ``blockwise`` every student block
    computes from the teacher's input to it (or, with ``teacher_share``, from that share of it and the rest of its
    own predecessor's output)."""
    hidden_states = bool(cfg.hidden_weight) and not blockwise  # block-wise: the hooks keep the blocks' outputs
    cached = isinstance(teacher, TeacherCache)
    parts_sum = torch.zeros(3, device=batches[0].device)  # loss, kl, hidden, summed over micro-batches
    for micro, batch in enumerate(batches):
        # DDP averages the gradients once per step, in the last micro-batch's backward
        with (TeacherForcedBlocks(None if cached else teacher, student, teacher_share) if blockwise
              else nullcontext()) as forced, student.no_sync() if ddp and micro < len(batches) - 1 else nullcontext():
            with torch.no_grad(), autocast:
                ids, t_out = (teacher.outputs(batch, hidden_states, forced) if cached else
                              (batch, teacher(input_ids=batch, output_hidden_states=hidden_states)))
            with autocast:
                s_out = student(input_ids=ids, output_hidden_states=hidden_states)
            loss, parts = distillation_loss(*(forced.outputs(s_out, t_out) if blockwise else (s_out, t_out)), cfg)
            (loss / len(batches)).backward()
        parts_sum += torch.stack([loss.detach(), parts["kl"], parts["hidden"]]) / len(batches)
        del t_out, s_out, loss  # the next micro-batch's forward must not find these still alive
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    return torch.cat([parts_sum, grad_norm.reshape(1).float()])


class GraphedStep:
    """step_gradients as a CUDA graph per phase (block-wise, end to end), replayed with each step's token ids (one
    tensor per micro-batch) copied into the captured ones.

    Eager, the host launches a step's thousands of kernels one by one (Python, autograd, the launches), and the
    GPU waits for it: SmolLM2-135M trained at ~40k tokens/s alone on an H200 but ~62k with two runs sharing it
    (docs/RESULTS.md). A replay launches the captured step at once. The capture allocates the gradients, and
    every replay writes them anew, so while a graph lives nothing may set them to None (train leaves out its
    zero_grad). A phase change drops the graph before capturing the next one, so one phase's memory is held at a
    time. What the step decides in Python (shapes, branches, the block-wise hooks) is fixed at the capture; only the
    ids, the weights and the buffers' values change between replays. Warm-up passes (on a side stream, their
    gradients discarded) run the lazy set-up first: cuBLAS workspaces, Triton's compiled kernels.

    ``update`` is the optimizer's step as a graph of its own, replayed after the loop has read the step's loss and
    norm, so a NaN still stops the run before the update. Eager, AdamW walks its parameters in Python every step
    (SmolLM2's ~2,500: 33.5 ms of host time a step against 1.5 ms on the GPU, docs/RESULTS.md), and the GPU waits for
    that between replays. The update is captured with the optimizer made capturable (its step counts on the GPU, each
    group's learning rate a GPU tensor that ``set_lr`` fills, its lazily made state made before the capture), and
    again after each phase's capture, whose gradients are new tensors.
    """

    def __init__(self, compute, optimizer, warmup: int = 3):
        self.compute, self.optimizer, self.warmup = compute, optimizer, warmup
        self.phase = self.graph = self.ids = self.stats = self.update_graph = None

    def __call__(self, batches: list[torch.Tensor], blockwise: bool) -> torch.Tensor:
        if blockwise != self.phase:
            self._capture(batches, blockwise)
        for captured, ids in zip(self.ids, batches, strict=True):
            captured.copy_(ids)
        self.graph.replay()
        return self.stats

    def update(self) -> None:
        if self.update_graph is None:
            self._capture_update()
        self.update_graph.replay()

    def _capture_update(self) -> None:
        device = self.ids[0].device
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for state in self.optimizer.state.values():  # a non-capturable run's, resumed: its step counts on the host
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
        # AdamW makes its state lazily at its first step, which the capture must find: made here as AdamW would
        # make it (zeros; the step count a float32 on the device)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.optimizer.state[p]:
                    self.optimizer.state[p].update(
                        step=torch.zeros((), dtype=torch.float32, device=p.device),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                        **({"max_exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                           if group["amsgrad"] else {}))
        self.update_graph = torch.cuda.CUDAGraph()
        # the step's graph and this one replay one after the other: one memory pool serves both
        with torch.cuda.graph(self.update_graph, pool=self.graph.pool()):
            self.optimizer.step()

    def _capture(self, batches: list[torch.Tensor], blockwise: bool) -> None:
        self.graph = self.stats = self.update_graph = None
        self.optimizer.zero_grad(set_to_none=True)
        self.ids = [ids.clone() for ids in batches]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.compute(self.ids, blockwise)
                self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.stats = self.compute(self.ids, blockwise)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # an operation of this model that a graph cannot hold (a sync, a host copy)
            while err.__context__ is not None:  # the capture's end raises again over the operation that broke it
                err = err.__context__
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"cuda_graphs: this model's training step cannot be captured as a CUDA graph "
                               f"({reason}); train without it (--resume --no-cuda-graphs continues from the last "
                               "checkpoint)") from err
        self.phase = blockwise
        torch.cuda.empty_cache()  # what the warm-up and the previous phase's graph held


def set_lr(group: dict, lr: float) -> None:
    """The group's learning rate for the next step: a float, or filled into the GPU tensor of a captured update."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def enable_checkpointing(model) -> None:
    """Gradient checkpointing of every decoder block (non-reentrant), by the name this transformers gives it."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # the newer transformers' name
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(student, cfg: TrainConfig) -> list[dict]:
    """Latent weights at lr_weight; scales, router and biases of the binarized layers (and, with
    train_norms, the weights of every RMSNorm/LayerNorm) at lr_scale."""
    weights, scales = [], []
    for module in student.modules():
        if isinstance(module, BinaryMoSLinear):
            weights.append(module.weight)
            scales += [module.scale_in, module.scale_out] + ([module.router.weight] if module.num_experts > 1 else [])
            scales += [module.bias] if module.bias is not None else []
        elif cfg.train_norms and "Norm" in type(module).__name__:
            scales += list(module.parameters(recurse=False))
    return [{"params": weights, "lr": cfg.lr_weight, "base_lr": cfg.lr_weight, "weight_decay": cfg.weight_decay},
            {"params": scales, "lr": cfg.lr_scale, "base_lr": cfg.lr_scale, "weight_decay": 0.0}]


def batch_indices(step: int, micro: int, cfg: TrainConfig, num_blocks: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Block indices of one micro-batch: epochs of seeded permutations, a pure function of the position.

    Micro-batch ``micro`` of ``rank`` is slice micro * world_size + rank of the step's global batch, so
    W ranks with grad_accum A see the micro-batches of one process with grad_accum A * W.
    """
    start = ((step * cfg.grad_accum + micro) * world_size + rank) * cfg.batch_size
    positions = torch.arange(start, start + cfg.batch_size)
    out = torch.empty_like(positions)
    for epoch in positions.div(num_blocks, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch))
        mask = positions.div(num_blocks, rounding_mode="floor") == epoch
        out[mask] = perm[positions[mask] % num_blocks]
    return out


def total_steps(cfg: TrainConfig, num_blocks: int, world_size: int = 1) -> int | None:
    """Optimizer steps of the run; None for a time budget (max_minutes), which ends when its time is up."""
    if cfg.max_minutes is not None:
        return None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world_size * cfg.seq_len
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    return max(1, math.ceil(cfg.epochs * num_blocks / (cfg.batch_size * cfg.grad_accum * world_size)))


class _StopOnSigterm:
    """Records SIGTERM instead of dying, so the loop can save a checkpoint first; the old handler comes back
    on exit. Only the main thread can take signals (elsewhere this does nothing)."""

    def __enter__(self):
        self.requested, self._old = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _trainable_state(student) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in student.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, student, optimizer, step: int, cfg: TrainConfig,
                    env: distributed.Env = distributed.Env(), seconds: float = 0.0) -> None:
    """Atomic: a temporary file renamed over the old checkpoint, so a kill never leaves a torn one.

    One process writes ``checkpoint.pt``; FSDP ranks a sharded directory (distributed.save_checkpoint).
    ``seconds``: training time so far, which a time budget continues from.
    """
    if env.distributed:
        return distributed.save_checkpoint(out, student, optimizer, step, cfg, env, seconds)
    path = out / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "seconds": seconds, "trainable": _trainable_state(student),
                "optimizer": portable_optimizer_state(optimizer), "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def portable_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() as an eager AdamW loads it, on any device: a captured update's GPU learning rates and
    step counts (GraphedStep.update) back as floats and host tensors; a graphed resume makes them capturable again."""
    state = optimizer.state_dict()
    return {"state": {key: {name: value.cpu() if name == "step" else value for name, value in values.items()}
                      for key, values in state["state"].items()},
            "param_groups": [{**group, "lr": float(group["lr"]), "capturable": False}
                             for group in state["param_groups"]]}


def prepare(cfg: TrainConfig, env: distributed.Env | None = None):
    """(teacher, student, tokenizer, blocks) on cfg.device (or sharded over env's ranks): the frozen
    teacher and its binarized copy.

    Under FSDP only rank 0 loads the weights, binarizes and samples the teacher's text; the other ranks
    build both models on the meta device and get their shards and the text from rank 0 (distributed.place).
    """
    env = env or distributed.Env(device=torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    device = env.device
    real, from_teacher = split_data(cfg.data)
    docs = documents(real, "train", cfg.data_dir) if real else []  # bad data fails before the model loads
    with distributed.main_first(env):
        teacher, tokenizer = load_model(cfg.model, dtype=torch.float32, device="cpu" if env.is_main else "meta")
    bos = leading_bos(teacher.config, tokenizer)
    blocks = [token_blocks(tokenizer, docs, cfg.seq_len, bos)] if real else []
    torch.manual_seed(cfg.seed)
    student = binarize(copy.deepcopy(teacher), cfg.binarization(), from_weights=env.is_main)
    if cfg.cuda_graphs and any(isinstance(m, BinarizedExperts) for m in student.modules()):
        raise ValueError("cuda_graphs: a mixture of experts picks each expert's tokens on the host, which a CUDA "
                         "graph cannot hold; train without --cuda-graphs")
    for layer in student.modules():
        if isinstance(layer, BinaryMoSLinear):
            layer.ste_clip = cfg.ste_clip
    teacher.requires_grad_(False).eval()
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    if from_teacher:  # sampled by rank 0 on its device, before the teacher is sharded and compiled
        if cfg.teacher_prompt_len and not real:
            raise DataError("teacher_prompt_len: the teacher continues real text; use --data teacher+SOURCE")
        prompts = prompt_windows(blocks[0], cfg.teacher_samples, cfg.teacher_prompt_len, cfg.seed, bos) \
            if cfg.teacher_prompt_len else None
        ids = teacher_tokens(teacher.to(device), tokenizer, cfg.model, cfg.teacher_samples,
                             cfg.teacher_seq_len or cfg.seq_len, cfg.teacher_temperature, cfg.seed,
                             cfg.teacher_batch_size, prompts) if env.is_main else None
        blocks.append(as_blocks(env.from_main(ids), cfg.seq_len, bos))
    blocks = torch.cat(blocks)
    student.requires_grad_(False)
    for group in param_groups(student, cfg):
        for p in group["params"]:
            p.requires_grad_(True)
    if needs_grad_checkpointing(cfg, teacher.config, env):
        enable_checkpointing(student)
    student.config.use_cache = False
    if cfg.bf16_compute and not env.sharded:  # FSDP2 computes with bf16 parameters already
        for p in student.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    teacher, student = distributed.place(env, teacher, student)
    # compiled in place (Module.compile): parameter names (checkpoints, save) stay as they are
    if cfg.compile != "none" and not cfg.cache_teacher:
        # the teacher runs one static shape without autograd: CUDA graphs take its ~1,000 launches a step off the host
        graphs = device.type == "cuda" and not env.distributed
        teacher.compile(mode="reduce-overhead" if graphs else None)
    if cfg.compile == "all":  # the whole model, not each block: blocks alone measured no faster (docs/RESULTS.md)
        student.compile()
    return teacher, student, tokenizer, blocks


def planned_memory(cfg: TrainConfig, config, gpus: int = 1, strategy: str = "fsdp") -> dict:
    """binarymos.plan's estimate for this run on ``gpus`` ranks (one: a plain process) sharing it by ``strategy``."""
    from .plan import count, estimate

    return estimate(count(config, cfg.num_experts), gpus, cfg.seq_len, cfg.batch_size,
                    residual=2 if cfg.bf16_compute else None, grad_accum=cfg.grad_accum, strategy=strategy,
                    fused_layer=cfg.compile != "all")


def available_memory() -> int:
    """Bytes of host memory free now (Linux's available pages; elsewhere unbounded)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _fits_gpu(need: int, env: distributed.Env) -> bool:
    """Whether ``need`` bytes (a planner estimate) stay within 75 % of this rank's GPU: more margin than the
    planner's 90 %, for what max_memory_allocated does not see (CUDA context, NCCL buffers, the caching
    allocator's fragmentation) and for the estimate's error (within 4 % on 18 measured runs, docs/SCALING.md)."""
    from .plan import TRAIN_FIT_FRACTION

    return need <= TRAIN_FIT_FRACTION * torch.cuda.get_device_properties(env.device).total_memory


def choose_strategy(cfg: TrainConfig, config, env: distributed.Env) -> str:
    """How several ranks share the run: cfg.strategy, or for "auto" "ddp" where the one-GPU plan of the run
    (binarymos.plan, with checkpointing if that is what it takes) fits 75 % of this GPU, else "fsdp".

    DDP computes what one process computes with no per-block all-gathers: on 2 H200 SmolLM2-135M trained
    at 1.96x one GPU's tokens/s with DDP and 1.23x with FSDP2; 8 blocks of the LLaMA-2-7B shape, which
    fit one GPU, at 1.69x with DDP but 1.90x with FSDP2 (docs/RESULTS.md, issue 6): for blocks that large
    pass "fsdp". On the CPU (gloo, tests) there is no GPU to plan against: "fsdp", the path that works at
    any size.
    """
    if cfg.strategy != "auto":
        return cfg.strategy
    if env.device.type != "cuda":
        return "fsdp"
    need = planned_memory(cfg, config, env.world_size, "ddp")
    return "ddp" if _fits_gpu(need["total" if cfg.grad_checkpointing is False else "total_checkpointed"], env) \
        else "fsdp"


def needs_grad_checkpointing(cfg: TrainConfig, config, env: distributed.Env) -> bool:
    """cfg.grad_checkpointing if set; else on a GPU, whether the run would not fit without it.

    Recomputing the blocks costs tokens/s: SmolLM2-135M at batch 2 x 2048 trained at 7.8k tokens/s
    with it and 12.5k without, alone on an H200 (docs/RESULTS.md). So it is on only where
    binarymos.plan's estimate without it exceeds 75 % of the GPU (_fits_gpu). On the CPU it is off.
    """
    if cfg.grad_checkpointing is not None:
        return cfg.grad_checkpointing
    if env.device.type != "cuda":
        return False
    needed = not _fits_gpu(planned_memory(cfg, config, env.world_size, env.strategy)["total"], env)
    if needed and cfg.cuda_graphs:
        raise ValueError("cuda_graphs: this run needs gradient checkpointing to fit the GPU (binarymos plan), which "
                         "a graph cannot capture; train without cuda_graphs or with a smaller batch")
    return needed


def train(cfg: TrainConfig):
    """Run (or resume) a distillation; returns the trained student. Under FSDP2: this rank's shard of it."""
    env = distributed.init(cfg.device)
    if env.distributed:
        from .footprint import load_config

        with distributed.main_first(env):  # rank 0 converts a .gguf; the others then read its config
            config = load_config(cfg.model, builtin=False)
        env = replace(env, strategy=choose_strategy(cfg, config, env))
    out, log_path = Path(cfg.out), Path(cfg.out) / "log.jsonl"
    found = distributed.latest_checkpoint(out)
    if cfg.resume and found is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    if not cfg.resume and (found is not None or (out / "model").exists() or log_path.exists()):
        raise FileExistsError(f"{out} holds a run already: pass --resume to continue it or choose another --out")
    if cfg.resume:
        check_resumable(cfg)
    if cfg.cuda_graphs and (env.device.type != "cuda" or env.distributed):
        raise ValueError(f"cuda_graphs needs one process on a GPU (this run: {env.world_size} on {env.device.type})")
    if cfg.cache_teacher and env.distributed:
        raise ValueError(f"cache_teacher needs one process (this run: {env.world_size})")
    teacher, student, tokenizer, blocks = prepare(cfg, env)
    device = env.device
    groups = param_groups(student, cfg)
    if cfg.method == "sign" or not groups[0]["params"]:
        raise ValueError("the static sign baseline has nothing to train; evaluate it directly")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    start, trained_seconds = (distributed.load_checkpoint(found[0], student, optimizer, cfg, env) if cfg.resume
                              else (0, 0.0))
    steps = total_steps(cfg, len(blocks), env.world_size)
    budget = cfg.max_minutes * 60 if steps is None else None
    # autocast's cache of cast weights lives for one region, which a graph's replays do not re-enter
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cfg.bf16_compute,
                              cache_enabled=not cfg.cuda_graphs)
    chosen = {"strategy": env.strategy} if env.distributed else {}  # what "auto" became
    if cfg.cache_teacher:  # built again on a resume, and counted in the clock again
        built = time.perf_counter()
        planned = planned_memory(cfg, teacher.config)[
            "total_checkpointed" if any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
            else "total"]
        on_gpu = device.type == "cuda"
        teacher = TeacherCache(teacher, blocks, cfg.batch_size, autocast,
                               fits=lambda nbytes: _fits_gpu(planned + nbytes, env) if on_gpu
                               else nbytes <= 0.5 * available_memory(),
                               host_fits=lambda nbytes: on_gpu and nbytes <= 0.5 * available_memory())
        trained_seconds += time.perf_counter() - built
        chosen.update(teacher_cache_gb=round(teacher.nbytes / 1e9, 3),
                      teacher_cache_on="host" if teacher.on_host else "device")
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        (out / "train_config.json").write_text(json.dumps(dict(asdict(cfg), **chosen), indent=2))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * env.world_size * cfg.seq_len
    ddp = env.distributed and not env.sharded
    teacher_share = torch.ones((), device=device) if cfg.blockwise_anneal else None  # filled in every step
    graphed = GraphedStep(lambda batches, blockwise: step_gradients(teacher, student, batches, cfg, blockwise,
                                                                    autocast, teacher_share=teacher_share),
                          optimizer) if cfg.cuda_graphs else None
    student.train()
    bar = tqdm(total=steps or round(budget), initial=start if steps else round(trained_seconds), desc="distil",
               unit="step" if steps else "s", dynamic_ncols=True, disable=not env.is_main)
    if env.is_main and _ends_mid_line(log_path):
        with open(log_path, "a") as log:  # a line a kill cut short: the resumed records start on lines of their own
            log.write("\n")
    with bar, open(log_path if env.is_main else os.devnull, "a") as log, _StopOnSigterm() as stop:  # one log: rank 0's
        t0, step, unlogged = time.perf_counter(), start, None
        while steps is None or step < steps:
            # the same clock and stop decision on every rank (one process: no communication)
            clock = env.mean({"seconds": trained_seconds + time.perf_counter() - t0, "stop": float(stop.requested)})
            if clock["stop"]:
                save_checkpoint(out, student, optimizer, step, cfg, env, clock["seconds"])
                raise TrainingStopped(f"stopped by SIGTERM after step {step}; the checkpoint in {out} holds it: "
                                      "the same command with --resume continues")
            if budget is not None and clock["seconds"] >= budget:
                break
            # a time budget runs the same warm-up and cosine over milliseconds of training instead of steps
            factor = (lr_factor(step, steps, max(1, round(cfg.warmup * steps))) if steps else
                      lr_factor(int(clock["seconds"] * 1000), int(budget * 1000),
                                max(1, round(cfg.warmup * budget * 1000))))
            for group in optimizer.param_groups:
                set_lr(group, group["base_lr"] * factor)
            torch.manual_seed(cfg.seed * 7919 + step)  # any randomness (dropout) is a function of the step
            # the first `blockwise` of the budget block by block (then `blockwise_anneal` of it less and less so),
            # the rest end to end
            progress = step / steps if steps else clock["seconds"] / budget
            blockwise = progress < cfg.blockwise + cfg.blockwise_anneal
            share = min(1.0, 1 - (progress - cfg.blockwise) / cfg.blockwise_anneal) if cfg.blockwise_anneal else 1.0
            if teacher_share is not None:
                teacher_share.fill_(share)
            if unlogged is not None and unlogged.get("blockwise") and not blockwise:  # the phase's last step, logged
                log.write(json.dumps(unlogged) + "\n")
                unlogged = None
            indices = [batch_indices(step, micro, cfg, len(blocks), env.rank, env.world_size)
                       for micro in range(cfg.grad_accum)]
            batches = teacher.batches(indices) if cfg.cache_teacher else [blocks[i].to(device) for i in indices]
            stats = (graphed(batches, blockwise) if graphed else
                     step_gradients(teacher, student, batches, cfg, blockwise, autocast, ddp, teacher_share))
            if cfg.cache_teacher and teacher.on_host:  # the next step's blocks cross over while this step runs
                teacher.prefetch([batch_indices(step + 1, micro, cfg, len(blocks), env.rank, env.world_size)
                                  for micro in range(cfg.grad_accum)])
            # the step's one wait for the GPU: reading the loss earlier (before the backward) would leave the
            # GPU idle while the host launches the backward; a NaN still stops the run before the update, and
            # every rank stops together
            *parts_read, norm = stats.tolist()
            terms = env.mean(dict(zip(("loss", "kl", "hidden"), parts_read)))
            if not math.isfinite(terms["loss"]):
                raise _diverged(f"loss is {terms['loss']}", step, out)
            if not math.isfinite(norm):
                raise _diverged(f"gradient norm is {norm}", step, out)
            if graphed:  # its replays write the gradients into the tensors its capture made: no zero_grad
                graphed.update()
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = trained_seconds + time.perf_counter() - t0  # this rank's; logged and saved by rank 0
            last = step == steps
            rate = (step - start) * tokens_per_step / (time.perf_counter() - t0)
            unlogged = {"step": step, "tokens": step * tokens_per_step, **{k: round(v, 6) for k, v in terms.items()},
                        **{f"lr_{name}": group["base_lr"] * factor
                           for name, group in zip(("weight", "scale"), optimizer.param_groups)},
                        **({"blockwise": True} if blockwise else {}),
                        **({"teacher_share": round(share, 6)} if blockwise and teacher_share is not None else {}),
                        "tokens_per_s": round(rate, 1), "train_seconds": round(seconds, 3),
                        "time": round(time.time(), 3)}
            if step % cfg.log_every == 0 or last:
                log.write(json.dumps(unlogged) + "\n")
                log.flush()
                unlogged = None
                bar.set_postfix(loss=f"{terms['loss']:.4f}", kl=f"{terms['kl']:.4f}", hid=f"{terms['hidden']:.4f}",
                                tok_s=f"{rate:.0f}")
            bar.update(1 if steps else min(round(seconds), round(budget)) - bar.n)
            if step % cfg.save_every == 0 or last:
                save_checkpoint(out, student, optimizer, step, cfg, env, seconds)
        if unlogged is not None:  # a time budget's last step, known only now
            log.write(json.dumps(unlogged) + "\n")
        if budget is not None:  # saved with the clock that ended the budget, so a resume does not step again
            save_checkpoint(out, student, optimizer, step, cfg, env, clock["seconds"])
    optimizer.zero_grad(set_to_none=True)  # a graph's gradients outlive its replays (eager's are gone already)
    del graphed  # and its memory pool goes back before the model is saved
    student = distributed.unwrap(student)
    if cfg.bf16_compute and not env.sharded:
        student.float()  # a plain float32 model again, usable outside autocast
    state = distributed.full_state_dict(env, student)
    if env.is_main:
        save_model(student, tokenizer, out / "model", state)
    env.barrier()
    return student


def save_model(student, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """The trained binarized model (latent weights, scales, router), as a Hugging Face directory.

    state_dict: the whole model's, gathered from FSDP shards (None: the model's own).
    """
    getattr(student, "activation_checkpointing_disable", student.gradient_checkpointing_disable)()
    student.config.use_cache = True
    tmp = directory.with_name(directory.name + ".tmp")
    # the tensors under the names the binarized model has: transformers would write some families' checkpoint
    # names (Mixtral's block_sparse_moe), which it maps back only when it loads the weights itself
    student.save_pretrained(tmp, state_dict=state_dict, save_original_format=False)
    tokenizer.save_pretrained(tmp)
    move_into_place(tmp, directory)
