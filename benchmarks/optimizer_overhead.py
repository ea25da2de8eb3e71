"""Host time of one gradient clip and one AdamW step over FSDP2's DTensor parameters against plain ones.

    python benchmarks/optimizer_overhead.py                          # one process
    torchrun --nproc-per-node 2 benchmarks/optimizer_overhead.py     # FSDP2, gloo on CPU, NCCL on GPUs

A 30-block LLaMA binarized with E=4 has SmolLM2-135M's 840 trainable tensors (latent weight, two
scale vectors and a router per linear); its sizes are tiny, so what is timed is the per-tensor
overhead, for AdamW's default, foreach and fused implementations (medians of 5 steps after one).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from binarymos.convert import BinaryMoSConfig, binarize
from binarymos.train import TrainConfig, param_groups


def student(device: torch.device):
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = binarize(AutoModelForCausalLM.from_config(config), BinaryMoSConfig(num_experts=4)).requires_grad_(False)
    for group in param_groups(model, TrainConfig(num_experts=4)):
        for p in group["params"]:
            p.requires_grad_(True)
    return model.to(device)


def median_ms(fn, device: torch.device) -> float:
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[2] * 1e3


def main() -> None:
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model = student(device)
    label = "one process"
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        label = f"FSDP2 on {dist.get_world_size()} ranks"
    params = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=torch.randint(0, 256, (1, 16), device=device)).logits.sum().backward()
    for options in ({}, {"foreach": True}, {"fused": True}):
        optimizer = torch.optim.AdamW(params, lr=1e-3, **options)
        step = median_ms(optimizer.step, device)
        clip = median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), device)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{label}, {device.type}, AdamW {options or 'default'}: {len(params)} tensors, "
                  f"step {step:.1f} ms, clip_grad_norm_ {clip:.1f} ms", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
