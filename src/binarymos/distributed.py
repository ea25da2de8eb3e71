"""Distillation over several GPUs (or CPU processes) with PyTorch FSDP2 or DDP, and sharded checkpoints.

``torchrun`` and ``accelerate launch`` set RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE unset
(or 1) nothing here starts a process group and train.py runs its plain single-process loop.

Two strategies (``Env.strategy``; train.choose_strategy picks one):

- ``fsdp``: both models sharded per decoder block (below). For models that do not fit one GPU.
- ``ddp``: every rank holds both models whole, as one process does, and DistributedDataParallel
  averages the gradients of the trainable parameters, overlapped with the backward pass. For models
  that fit: it computes exactly what one process computes (float32 residual stream, no per-block
  all-gathers), so its loss curve is one process's and it scales with the GPUs.

How the work is split over W ranks:

- data: optimizer step s takes global positions [s*G, (s+1)*G) of the seeded block order,
  G = batch_size * grad_accum * W; micro-batch m of rank r is slice m*W + r of it
  (``train.batch_indices``). So W ranks with grad_accum A see, micro-batch by micro-batch, what one
  process with grad_accum A*W sees, and their loss and gradients are the same up to rounding.
- student: every decoder block is one FSDP2 unit (latent weights, scales, router, gradients and
  AdamW state split over the ranks); embeddings, final norm and LM head form the root unit. On CUDA
  blocks are all-gathered in bf16 and gradients reduce-scattered in fp32.
- teacher: frozen and sharded the same way under FSDP2 (at 7B a replicated bf16 teacher would cost
  13.5 GB per GPU), all-gathered block by block in its forward; whole on every rank under DDP.
- loading: only rank 0 reads the weights, binarizes, samples the teacher's text and evaluates; the
  other ranks build both models on the meta device and receive their shards (and the text) from
  rank 0, so only host 0 ever holds a whole model. They wait for it in a collective, hence the long
  process-group timeout.
- checkpoints: torch.distributed.checkpoint (DCP) directories ``checkpoints/step-00000042``, written
  under a ``.tmp`` name and renamed once complete, so a kill never leaves a torn one. DCP reshards
  on load: a checkpoint of 2 ranks resumes on 1 (a plain process) or on 4. A plain process's
  ``checkpoint.pt`` resumes under torchrun too. Resuming keeps the global batch: grad_accum is
  rescaled when the number of ranks changed.
"""
from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from .convert import decoder_blocks

TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights come from the teacher
# the other ranks wait for rank 0 alone to load, sample the teacher's text, evaluate: NCCL's default is 10 min
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Env:
    """This process's place in the run; the defaults are a plain single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "fsdp"  # of several ranks: "fsdp" (shards) or "ddp" (replicas)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether each rank holds a shard of the models (FSDP2), not the whole of them."""
        return self.distributed and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (the same result on every rank); unchanged in one process."""
        if not self.distributed:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return dict(zip(values, (t / self.world_size).tolist()))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; the other ranks pass None); ``obj`` in one process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


@contextmanager
def main_first(env: Env):
    """Rank 0 runs the block, then the other ranks (which may read what it wrote: a converted .gguf)."""
    if not env.is_main:
        env.barrier()
    yield
    if env.is_main:
        env.barrier()


def init(device: str | None = None) -> Env:
    """The process group of a torchrun / accelerate launch (NCCL on CUDA, gloo for ``device="cpu"``).

    Each rank takes the GPU ``LOCAL_RANK``; a ``device`` index is ignored under a launcher.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Env(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None, timeout=TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Env(int(os.environ["RANK"]), world_size, dev)


def place(env: Env, teacher, student):
    """Both models on env.device: moved whole in one process, sharded per decoder block under FSDP2,
    copied from rank 0 to every rank under DDP (the student then wrapped in DistributedDataParallel).

    Under FSDP2 rank 0 holds the weights and the other ranks meta-device models (train.prepare): each
    model is sharded, the other ranks allocate their empty shards, and rank 0's full state dict is
    broadcast into every rank's shards. fully_shard moves each unit to the device as it shards it, so a
    model larger than one GPU never has to fit on one. The roots reshard after forward: the teacher has
    no backward to do it.
    """
    if not env.distributed:
        return teacher.to(env.device), student.to(env.device)
    if env.strategy == "ddp":
        for model in (teacher, student):
            full = model.to(env.device).state_dict() if env.is_main else {}
            if not env.is_main:
                model.to_empty(device=env.device)
                model.tie_weights()  # to_empty gives tied parameters separate storage
            _broadcast_from_main(model, full)
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device] if env.device.type == "cuda" else None
        return teacher, DistributedDataParallel(student, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    bf16 = env.device.type == "cuda"
    for model, policy in ((teacher, MixedPrecisionPolicy()),  # already bf16 on CUDA (train.prepare)
                          (student, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                           if bf16 else MixedPrecisionPolicy())):
        full = model.state_dict() if env.is_main else {}
        for block in decoder_blocks(model)[1]:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=model is teacher)
        if not env.is_main:
            model.to_empty(device=env.device)
        _broadcast_from_main(model, full)
    return teacher, student


def _broadcast_from_main(model, full: dict) -> None:
    """Rank 0's state dict ``full`` into every rank's model (its shards, under FSDP2), and its buffers."""
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # the non-persistent ones (rotary inv_freq ...) are in no state dict
        dist.broadcast(buffer, src=0)


def unwrap(student):
    """The model itself: DDP's wrapper removed (FSDP2 and one process leave the model as it is)."""
    return getattr(student, "module", student)


def full_state_dict(env: Env, student) -> dict | None:
    """The student's whole state dict on rank 0 (CPU), for save_pretrained; None where a rank holds it whole."""
    if not env.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    """(path, step) of the newest complete checkpoint of a run: ``checkpoint.pt`` or a DCP directory."""
    found = [(int(d.name.split("-")[1]), d) for d in (out / "checkpoints").glob("step-*") if d.suffix != ".tmp"]
    if (out / "checkpoint.pt").exists():
        found.append((read_checkpoint(out / "checkpoint.pt", mmap=True)["step"], out / "checkpoint.pt"))
    return max(found)[::-1] if found else None


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A plain checkpoint.pt; one that is cut short or not a checkpoint is a one-line error naming it."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({str(err).strip().splitlines()[0]}); "
                         "move it away to start the run afresh, or restore it") from err


def save_checkpoint(out: Path, student, optimizer, step: int, cfg, env: Env, seconds: float = 0.0) -> None:
    """Every rank writes its shards of the trainable state; rank 0 renames the directory when all are done."""
    final = out / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed
    env.barrier()
    model_state, optim_state = get_state_dict(student, optimizer, options=TRAINABLE)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if env.is_main:
        meta = {"step": step, "seconds": seconds, "world_size": env.world_size, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum}
        (tmp / "trainer.json").write_text(json.dumps(meta))
        os.replace(tmp, final)
        for old in final.parent.glob("step-*"):
            if old.suffix != ".tmp" and old.name < final.name:
                shutil.rmtree(old)
    env.barrier()


def load_checkpoint(path: Path, student, optimizer, cfg, env: Env) -> tuple[int, float]:
    """Restore the trainable state into the model and optimizer as laid out now; returns (step, seconds of
    training so far).

    A DCP directory loads into any number of ranks (none: a plain process). A plain ``checkpoint.pt``
    (optimizer state keyed by parameter index) is re-keyed by parameter name and loaded whole on
    every rank, each keeping its own shard.
    """
    if path.is_dir():
        saved = json.loads((path / "trainer.json").read_text())
        model_state, optim_state = get_state_dict(student, optimizer, options=TRAINABLE)
        state = {"model": model_state, "optimizer": optim_state}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=not env.distributed)
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=TRAINABLE)
    else:
        state = read_checkpoint(path)
        saved = dict(state["config"], world_size=1, step=state["step"], seconds=state.get("seconds", 0.0))
        if not env.distributed:
            student.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
        else:
            names = {p: n for n, p in student.named_parameters()}
            names = [names[p] for group in optimizer.param_groups for p in group["params"]]
            optim = {"state": {names[i]: s for i, s in state["optimizer"]["state"].items()},
                     "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                      for g in state["optimizer"]["param_groups"]]}
            set_state_dict(student, optimizer, model_state_dict=state["trainable"], optim_state_dict=optim,
                           options=StateDictOptions(full_state_dict=True, strict=False))
    _keep_global_batch(cfg, saved, env)
    return saved["step"], saved.get("seconds", 0.0)


def _keep_global_batch(cfg, saved: dict, env: Env) -> None:
    """Rescale grad_accum so a run resumed on another number of ranks keeps its data order and schedule."""
    global_batch = saved["batch_size"] * saved["grad_accum"] * saved["world_size"]
    if cfg.batch_size * cfg.grad_accum * env.world_size == global_batch:
        return
    per_micro = cfg.batch_size * env.world_size
    if global_batch % per_micro:
        raise ValueError(f"the checkpoint's global batch is {global_batch} sequences, not a multiple of "
                         f"batch_size {cfg.batch_size} x {env.world_size} ranks: choose another --batch-size")
    if env.is_main:
        print(f"binarymos: resuming a {saved['world_size']}-rank run on {env.world_size}: grad_accum "
              f"{cfg.grad_accum} -> {global_batch // per_micro} keeps the global batch of {global_batch}",
              file=sys.stderr)
    cfg.grad_accum = global_batch // per_micro
