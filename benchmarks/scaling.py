"""Issue 6's measurements on a 2-GPU machine: FSDP2 throughput, loss-curve match, kill-and-resume, planner.

    python benchmarks/scaling.py --out $OUT                       # everything (under 9.5 minutes on 2 H200)
    python benchmarks/scaling.py --out $OUT --only smollm2        # or: llama7b, resume, planner, noise

For each model (smollm2-135m; a LLaMA-2-7B-shaped model with random weights, --layers of its 32
blocks and SmolLM2's tokenizer) it distils --steps steps on 1 GPU (a plain process, batch b x
grad_accum 2) and on 2 GPUs (torchrun, batch b per GPU) once per --strategies (ddp, fsdp): the same
global batch, seed and data, so the loss curves should agree. Every run records torch.cuda.max_memory_allocated per rank next to the
planner's estimate (binarymos.plan). ``resume`` kills a 2-GPU smollm2 run after its first checkpoint
and resumes it in one process. ``planner`` makes short runs (PLANNER_STEPS steps) of configurations
the planner was not built from, each peak against its estimate. ``noise`` runs the one-GPU smollm2 run
twice at once, one per GPU, same seed: how far two runs that should be equal part (the noise floor of
the loss-curve comparison). Results: OUT/scaling.json and OUT/scaling.md.

Runs live in $BINARYMOS_BENCH_WORK (default /tmp/binarymos-scaling): a variant (--config-extra) needs
its own, since a run directory is never overwritten.

Targets (issue 6): 2-GPU tokens/s >= 1.8x 1-GPU; loss curves match within noise; the resumed run
finishes; the planner within 15 % of every measured peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3  # left out of tokens/s: allocator warm-up, first all-gathers
PLANNER_STEPS = 4  # enough for every phase of a step to have peaked (the optimizer's state exists from step 1)
# (LLaMA-2-7B-shape blocks, GPUs, strategy, batch per GPU, grad_accum, checkpointing): each peaks at a different
# moment of plan.py's step (backward's start, with or without gradients kept; the optimizer step)
PLANNER_RUNS = [(8, 2, "fsdp", 2, 1, False), (8, 2, "fsdp", 1, 2, False), (8, 2, "fsdp", 1, 2, True),
                (8, 1, "fsdp", 1, 1, True)]


def run_one(args) -> None:
    """One training run in this process (or this torchrun rank); writes peak-rank{R}.json into the run."""
    import torch

    from binarymos import train as train_mod
    from binarymos.distributed import Env
    from binarymos.footprint import load_config
    from binarymos.train import TrainConfig, choose_strategy, needs_grad_checkpointing, planned_memory, train

    cfg = TrainConfig(**json.loads(args.config))
    if args.kill_after_first_checkpoint:
        real_save = train_mod.save_checkpoint

        def save_then_die(*a, **kw):
            real_save(*a, **kw)
            raise KeyboardInterrupt

        train_mod.save_checkpoint = save_then_die
    cuda = torch.cuda.is_available()  # a CPU smoke test of this script records no peaks
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        train(cfg)
    except KeyboardInterrupt:
        pass
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    model_dir = cfg.model if Path(cfg.model).is_dir() else None
    planned = None
    if model_dir:
        config = load_config(model_dir)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        env = Env(rank, world, device)
        env = Env(rank, world, device, choose_strategy(cfg, config, env))  # as train decided
        result = planned_memory(cfg, config, world, env.strategy)
        planned = result["total_checkpointed" if needs_grad_checkpointing(cfg, config, env) else "total"]
    (Path(cfg.out) / f"peak-rank{rank}.json").write_text(json.dumps(
        {"max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else 0, "planned": planned, "world_size": world}))


def model_dir(name: str, layers: int, work: Path, source: str = "smollm2-135m") -> str:
    """A Hugging Face directory for the planner and for train: smollm2-135m (from ``source``, any name
    load_model takes) as HF, or a random LLaMA-2-7B shape with its tokenizer."""
    from binarymos.models import load_model

    target = work / (name if name != "llama7b" else f"llama-2-7b-{layers}l")
    if (target / "config.json").exists():
        return str(target)
    model, tokenizer = load_model(source)
    if name == "llama7b":
        import torch
        from transformers import AutoModelForCausalLM

        from binarymos.footprint import load_config

        config = load_config("llama-2-7b")
        config.num_hidden_layers, config.vocab_size = layers, len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def launch(cfg: dict, gpus: int, kill: bool = False, gpu_index: int = 0, wait: bool = True):
    """Run ``cfg`` on ``gpus`` GPUs (one: the gpu_index-th visible one); without ``wait``, return the process."""
    cmd = [str(Path(__file__)), "run", "--config", json.dumps(cfg)] + (["--kill-after-first-checkpoint"] if kill else [])
    if gpus == 1:
        cmd = [sys.executable] + cmd
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible[gpu_index])
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] + cmd
        env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    print("+", " ".join(cmd[:6]), "...", cfg["out"], flush=True)
    process = subprocess.Popen(cmd, env=env)
    if wait and process.wait():
        raise subprocess.CalledProcessError(process.returncode, cmd)
    return process


def read_run(out: Path) -> dict:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = log[min(WARMUP_STEPS, len(log) - 2)]
    rate = (log[-1]["tokens"] - first["tokens"]) / (log[-1]["time"] - first["time"])
    peaks = [json.loads(p.read_text()) for p in sorted(out.glob("peak-rank*.json"))]
    return {"tokens_per_s": round(rate, 1), "loss": [r["loss"] for r in log], "steps": [r["step"] for r in log],
            "peaks_gb": [round(p["max_memory_allocated"] / 1e9, 3) for p in peaks],
            "planned_gb": round(peaks[0]["planned"] / 1e9, 3) if peaks and peaks[0]["planned"] else None}


def loss_differences(a: dict, b: dict) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["loss"], b["loss"])]


def compare(name: str, one: dict, two: dict) -> dict:
    diffs = loss_differences(two, one)
    # the issue's measure: the estimate's error relative to the measured peak
    planner = [r["planned_gb"] / p - 1 for r in (one, two) for p in r["peaks_gb"] if r["planned_gb"] and p]
    return {"model": name, "one_gpu": one, "two_gpus": two,
            "speedup": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
            "loss_max_rel_diff": round(max(diffs), 5), "loss_mean_rel_diff": round(sum(diffs) / len(diffs), 5),
            "planner_error_max": round(max(planner, key=abs), 3) if planner else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb")
    run = sub.add_parser("run")
    run.add_argument("--config", required=True)
    run.add_argument("--kill-after-first-checkpoint", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench"))
    parser.add_argument("--only", default="smollm2,resume,llama7b")
    parser.add_argument("--model", default="smollm2-135m", help="where smollm2-135m comes from (e.g. a .gguf path)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strategies", default="ddp,fsdp", help="of the 2-GPU runs (train's --strategy)")
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks of the LLaMA-2-7B shape (of 32)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--config-extra", default="{}",
                        help='TrainConfig fields for every run, as JSON, e.g. \'{"batch_size": 8, "compile": true}\'')
    args = parser.parse_args()
    if args.verb == "run":
        return run_one(args)
    out = Path(args.out)
    work = Path(os.environ.get("BINARYMOS_BENCH_WORK", "/tmp/binarymos-scaling"))
    results_path = out / "scaling.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    batch = {"smollm2": 4, "llama7b": 1}

    def comparison_base(name: str) -> dict:
        """The TrainConfig fields that a model's 1-GPU and 2-GPU comparison runs (and the noise runs) share."""
        base = dict(model=model_dir(name, args.layers, work, args.model), data="c4_wiki", seq_len=args.seq_len,
                    batch_size=batch[name], max_steps=args.steps, save_every=10**6, num_experts=4)
        return dict(base, **json.loads(args.config_extra))

    for name in args.only.split(","):  # in the order given; each one's results are written as soon as they exist
        if name == "planner":
            results["planner"] = []
            for layers, gpus, strategy, batch_size, accum, checkpointing in PLANNER_RUNS:
                label = f"llama7b-{layers}l {gpus}gpu {strategy} b{batch_size} ga{accum} ckpt {checkpointing}"
                run_dir = work / ("planner " + label).replace(" ", "-")
                launch(dict(model=model_dir("llama7b", layers, work, args.model), data="c4_wiki", seq_len=args.seq_len,
                            batch_size=batch_size, grad_accum=accum, grad_checkpointing=checkpointing, strategy=strategy,
                            max_steps=PLANNER_STEPS, save_every=10**6, num_experts=4, out=str(run_dir)), gpus)
                run = read_run(run_dir)
                results["planner"].append({"run": label, "planned_gb": run["planned_gb"], "peaks_gb": run["peaks_gb"],
                                           "error": round(run["planned_gb"] / max(run["peaks_gb"]) - 1, 4)})
                write(out, results)
        elif name == "noise":
            base = dict(comparison_base("smollm2"), grad_accum=2)  # the 1-GPU comparison run, twice
            runs = [launch(dict(base, out=str(work / f"noise-{i}")), 1, gpu_index=i, wait=False) for i in (0, 1)]
            if any(r.wait() for r in runs):
                raise RuntimeError("a noise-floor run failed")
            diffs = loss_differences(read_run(work / "noise-0"), read_run(work / "noise-1"))
            results["noise"] = {"config": base, "loss_mean_rel_diff": round(sum(diffs) / len(diffs), 5),
                                "loss_max_rel_diff": round(max(diffs), 5)}
        elif name == "resume":
            base = dict(model=model_dir("smollm2", args.layers, work, args.model), data="c4_wiki", seq_len=args.seq_len,
                        batch_size=4, max_steps=12, save_every=6, num_experts=4, out=str(work / "resume"))
            launch(dict(base, grad_accum=1), 2, kill=True)
            launch(dict(base, grad_accum=1, resume=True), 1)  # grad_accum becomes 2: the global batch is kept
            run = read_run(work / "resume")
            results["resume"] = {"steps": run["steps"], "finished": run["steps"][-1] == 12, "loss": run["loss"]}
        else:
            base = comparison_base(name)
            launch(dict(base, grad_accum=2, out=str(work / f"{name}-1gpu")), 1)
            for strategy in args.strategies.split(","):
                launch(dict(base, grad_accum=1, strategy=strategy, out=str(work / f"{name}-2gpu-{strategy}")), 2)
                results[f"{name} {strategy}"] = compare(f"{name} ({strategy})", read_run(work / f"{name}-1gpu"),
                                                        read_run(work / f"{name}-2gpu-{strategy}"))
                write(out, results)
        write(out, results)
    write(out, results)
    print(markdown(results))


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    (out / "scaling.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| model | tokens/s 1 GPU | tokens/s 2 GPUs | speedup | loss max rel diff | peak GB 1 / 2 GPUs "
             "| planned GB 1 / 2 | planner error |", "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in (v for k, v in results.items() if k not in ("resume", "planner", "noise")):
        one, two = r["one_gpu"], r["two_gpus"]
        lines.append(f"| {r['model']} | {one['tokens_per_s']:,.0f} | {two['tokens_per_s']:,.0f} | {r['speedup']:.2f}x "
                     f"| {r['loss_max_rel_diff']:.2e} | {one['peaks_gb']} / {two['peaks_gb']} "
                     f"| {one['planned_gb']} / {two['planned_gb']} | {r['planner_error_max']} |")
    if "resume" in results:
        lines.append(f"\nkill on 2 GPUs after step 6, resume on 1: steps {results['resume']['steps']}, "
                     f"finished: {results['resume']['finished']}")
    if "noise" in results:
        noise = results["noise"]
        lines.append(f"\ntwo one-GPU runs of one seed (noise floor): loss mean / max relative difference "
                     f"{noise['loss_mean_rel_diff']:.2%} / {noise['loss_max_rel_diff']:.2%}")
    if "planner" in results:
        lines += ["\n| planner run | planned GB | measured peak GB per rank | error |", "|---|---:|---|---:|"]
        lines += [f"| {r['run']} | {r['planned_gb']} | {r['peaks_gb']} | {r['error']:+.1%} |" for r in results["planner"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
