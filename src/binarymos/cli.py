"""The `binarymos` command: one verb per step of the workflow."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from . import __version__
from .data import DEFAULT_DATA
from .models import DEFAULT_MODEL


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _int_at_least(low: int):
    """An argparse type: an integer >= low (-E 0, --eval-windows 0 ran and misled instead of stopping)."""
    def parse(value: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", value) or int(value) < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value!r}")
        return int(value)
    return parse


def _finite(value: str) -> float:
    """An argparse type: a finite number (float() reads 'nan' and 'inf', which then pass every comparison test)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def _ppl_sets(value: str) -> list[str]:
    from .data import EVAL_SETS

    sets = _csv(value)
    if not sets:
        raise argparse.ArgumentTypeError("names no evaluation set: use wikitext2, c4 or both")
    unknown = [s for s in sets if s not in EVAL_SETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown evaluation set {unknown[0]!r}: use {', '.join(EVAL_SETS)}")
    return sets


def _add_eval_args(p: argparse.ArgumentParser, default_sets: str) -> None:
    p.add_argument("--ppl", type=_ppl_sets, default=_csv(default_sets),
                   help=f"perplexity sets, comma-separated: wikitext2,c4 (default: {default_sets or 'none'})")
    p.add_argument("--eval-seq-len", type=_int_at_least(2), default=2048,
                   help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=_int_at_least(1), default=None,
                   help="evaluate only the first N windows of each set")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local copy of the text laid out like shared/data (default: $BINARYMOS_DATA_DIR)")


def _train_config(args):
    """The TrainConfig of a parsed `train` command line; with --resume only the options it set itself
    (args.options_given, from main) are taken from it, the rest from the run's own settings."""
    from .train import TrainConfig, resume_settings

    if args.resume:
        return TrainConfig(**resume_settings(args.out, {k: getattr(args, k) for k in args.options_given}))
    return TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())})


def _train_options_given(argv: list[str] | None) -> set[str]:
    """The TrainConfig fields this `train` command line sets itself. argparse fills in the others with their
    defaults, which --resume must tell apart from a default value given on purpose (`-E 4` resuming an E=2 run
    is an error, not E=2): the same parse, with a marker as every default."""
    from .train import TrainConfig

    names, left_out = set(vars(TrainConfig())), object()
    parser = build_parser()
    parser.verb_parsers["train"].set_defaults(**dict.fromkeys(names, left_out))
    return {k for k, v in vars(parser.parse_args(argv)).items() if k in names and v is not left_out}


def _cmd_train(args) -> None:
    from . import distributed
    from .train import train

    cfg = _train_config(args)
    env = distributed.init(cfg.device)
    if args.ppl:
        _report(cfg, args, env, lambda: train(cfg))
    else:
        train(cfg)
    if env.is_main:
        print(f"saved {Path(cfg.out) / 'model'}")


def _report(cfg, args, env, run_training) -> None:
    """Perplexity of the full-precision model, the static sign baseline, the student before and after.

    Under torchrun rank 0 evaluates alone, the trained student as saved in RUN/model, while the others wait.
    """
    import copy

    import torch

    from .convert import BinaryMoSConfig, binarize
    from .eval import perplexity

    rows = {}
    if env.is_main:
        teacher, tokenizer = _load_for_inference(cfg.model, str(env.device))  # on the training device
        evaluate = lambda m: {s: perplexity(m, tokenizer, s, args.eval_seq_len, args.eval_windows, cfg.data_dir)
                              for s in args.ppl}
        rows = {"full precision": evaluate(teacher),
                "static sign": evaluate(binarize(copy.deepcopy(teacher), BinaryMoSConfig(method="sign")))}
        if not cfg.resume:
            torch.manual_seed(cfg.seed)  # seeded as the run is: its routers and experts (the same draws on the CPU)
            init = binarize(copy.deepcopy(teacher), cfg.binarization())
            rows[f"{_label(cfg)} before training"] = evaluate(init)
            del init
        del teacher
    env.barrier()
    student = run_training()
    if env.is_main:
        if env.distributed:  # this rank holds a shard of the student
            student = _load_for_inference(str(Path(cfg.out) / "model"), str(env.device))[0]
        rows[f"{_label(cfg)} trained"] = evaluate(student.float())
        _print_table(rows, args.ppl)
        results = {"eval_seq_len": args.eval_seq_len, "eval_windows": args.eval_windows, "perplexity": rows}
        tmp = Path(cfg.out) / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, Path(cfg.out) / "results.json")  # whole or not at all: pack's model card reads it
    env.barrier()


def _label(cfg) -> str:
    return "OneBit (E=1)" if cfg.num_experts == 1 else f"BinaryMoS (E={cfg.num_experts})"


def _print_table(rows: dict[str, dict[str, float]], sets: list[str]) -> None:
    print("| model | " + " | ".join(f"{s} ppl" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[s]:,.2f}" for s in sets) + " |")


def _check_device(device: str | None) -> None:
    """--device cuda where there is no such GPU: one line now, not torch's AssertionError after loading the model."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.partition(":")[2]
    if gpus == 0 or (index.isdigit() and int(index) >= gpus):
        raise ValueError(f"--device {device}: this machine has {gpus} CUDA GPU{'' if gpus == 1 else 's'}")


def _load_for_inference(name: str, device: str | None):
    """(model, tokenizer): a packed directory through binarymos.load, anything else through load_model."""
    import torch

    from .models import load_model, load_tokenizer
    from .pack import is_packed, load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_packed(name):
        return load(name, device=device), load_tokenizer(name)
    return load_model(name, device=device)


def _cmd_eval(args) -> None:
    from .eval import perplexity

    sets = args.ppl if args.ppl is not None else ([] if args.tasks else _csv("wikitext2,c4"))
    model, tokenizer = _load_for_inference(args.model, args.device)
    if args.sign:
        from .convert import BinaryMoSConfig, binarize

        binarize(model, BinaryMoSConfig(method="sign"))
    rows = {args.model: {s: perplexity(model, tokenizer, s, args.eval_seq_len, args.eval_windows, args.data_dir)
                         for s in sets}}
    if sets:
        _print_table(rows, sets)
    if args.tasks:
        from .harness import METRICS, zero_shot

        accuracy = zero_shot(model, tokenizer, args.tasks, args.task_path, args.limit)
        rows[args.model].update(accuracy)
        print("| task | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
        for task, values in accuracy.items():
            print(f"| {task} | " + " | ".join(f"{values[m]:.4f}" if m in values else "-" for m in METRICS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _cmd_pack(args) -> None:
    from .pack import pack

    out = pack(args.source, args.out, args.num_experts, args.method, args.dtype, args.max_shard_size, args.overwrite)
    print(f"packed {out}")


def _cmd_footprint(args) -> None:
    from .footprint import format_table, report

    if (args.directory is None) == (args.config is None):
        raise ValueError("footprint: give a packed DIRECTORY or --config NAME|PATH (one of them)")
    result = report(args.config, args.directory, args.num_experts)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


def _cmd_plan(args) -> None:
    from .plan import format_plan, parse_bytes, plan

    result = plan(args.config, args.gpus, args.seq_len, args.batch, parse_bytes(args.gpu_memory), args.num_experts,
                  args.grad_accum, args.strategy, args.cache_tokens)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def _cmd_generate(args) -> None:
    import torch

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("generate: needs --temperature >= 0 and 0 < --top-p <= 1")
    if args.compile:
        from . import kernels

        kernels.CPU_COMPILE = True
    model, tokenizer = _load_for_inference(args.model, args.device)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("generate: the prompt is empty and this tokenizer adds no start token: give some text")
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    else:
        sampling = {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
    print(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _cmd_compare(args) -> None:
    """Validate everything once here, prepare what every job shares, then run the jobs (binarymos.compare)."""
    import shlex

    import torch

    from .compare import method_options, study, table
    from .footprint import load_config
    from .synth import split_data
    from .train import prepare

    runs = {m: method_options(m) for m in _csv(args.methods)}
    if not runs:
        raise ValueError("compare: --methods names no method")
    if (args.parallel is not None and args.parallel < 1) or args.threads < 1 or not args.deadline > 0:
        raise ValueError("compare: --parallel and --threads must be >= 1, and --deadline > 0 seconds")
    if (Path(args.out) / "compare.json").exists():
        raise FileExistsError(f"{args.out} holds a comparison already (compare.json): choose another --out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shared = ["--device", device] + (["--data-dir", args.data_dir] if args.data_dir else [])
    budget = (["--max-tokens", str(args.max_tokens)] if args.max_tokens is not None
              else ["--max-minutes", str(args.max_minutes)])
    train_args = ["--data", args.data, *budget, "--seed", str(args.seed)] + shared
    train_args += shlex.split(args.train_args)
    eval_args = ["--ppl", ",".join(args.ppl), "--eval-seq-len", str(args.eval_seq_len)] + shared
    eval_args += ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    parsed = build_parser().parse_args(["train", "--model", args.model] + train_args)  # bad options fail now
    if parsed.resume:
        raise ValueError("compare: --train-args cannot hold --resume; every compare job trains anew into --out")
    cfg = _train_config(parsed)
    load_config(args.model, builtin=False)  # a bad model fails now, and a .gguf is converted once, not by every job
    if split_data(cfg.data)[1] and any(run is not None for run in runs.values()):
        prepare(cfg)  # samples the teacher's text into the cache once, before the jobs read it
        torch.cuda.empty_cache()
    runs = {m: run if run is not None else m for m, run in runs.items()}
    gpus = _csv(args.gpus) if args.gpus else []
    report = study(runs, args.model, train_args, eval_args, args.out, args.ppl, device,
                   args.parallel or max(1, len(gpus)), args.threads, gpus, args.deadline)
    print(table(report))
    failed = [name for name, run in report["runs"].items() if run["status"].startswith("failed")]
    if failed:  # the table and compare.json are written: the error says where to look
        raise RuntimeError(f"compare: {len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); their logs are "
                           f"{Path(args.out) / '<run>.log'}")


def _cmd_analyze(args) -> None:
    from .analyze import DEFAULT_TEXT, analyze

    summary = analyze(args.run, args.out, args.layers, DEFAULT_TEXT if args.text is None else args.text,
                      plots=args.plots)
    print(f"{'pictures and ' if args.plots else ''}analyze.json in {args.out}; the experts' mean spread "
          f"{summary['expert_spread_mean']:.4f}")


def _cmd_bench(args) -> None:
    """Both GPU benchmarks of a source checkout (benchmarks/ is not installed with the package)."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("bench: needs a CUDA GPU")
    root = Path(__file__).resolve().parents[2]
    scripts = root / "benchmarks"
    if not (scripts / "linear_latency.py").exists():
        raise OSError(f"bench: {scripts} not found; run it from a source checkout of binarymos")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")])))
    for name in ("linear_latency", "decode"):
        if subprocess.run([sys.executable, str(scripts / f"{name}.py"), "--out", str(out / f"{name}.md")],
                          env=env).returncode:
            raise RuntimeError(f"bench: benchmarks/{name}.py failed (its output is above)")
    print(f"tables in {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="binarymos", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    parser.verb_parsers = verbs.choices  # name -> the verb's parser

    p = verbs.add_parser("train", help="binarize a model and distil it from the original")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local directory, .gguf file or smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="wikitext2, c4, c4_wiki, calib or .txt/.jsonl/.json.gz files; teacher: text sampled from "
                        "the teacher (cached); teacher+SOURCE: both")
    _add_data_dir(p)
    p.add_argument("--teacher-samples", type=int, default=1024, help="teacher-written sequences (default 1024)")
    p.add_argument("--teacher-seq-len", type=int, default=None, help="their length in tokens (default: --seq-len)")
    p.add_argument("--teacher-temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy")
    p.add_argument("--teacher-batch-size", type=int, default=64, help="sequences generated at once")
    p.add_argument("--teacher-prompt-len", type=int, default=0,
                   help="with teacher+SOURCE: each sequence continues this many tokens of the real text (default 0: "
                        "one random token)")
    p.add_argument("--out", default="runs/binarymos", help="run directory (checkpoint, log, model)")
    p.add_argument("--method", default="mos", choices=["mos"], help="mos: BinaryMoS (E=1 is OneBit)")
    p.add_argument("--num-experts", "-E", type=_int_at_least(1), default=4,
                   help="scaling experts per layer (1 = OneBit)")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="default: ours, tuned for small budgets; paper: the authors' exact setting")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default: the recipe's; "
                   "the default recipe's is 8, and 4 with --cuda-graphs)")
    p.add_argument("--grad-accum", type=int, default=1)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-tokens", type=int, default=None, help="training budget in tokens")
    budget.add_argument("--max-steps", type=int, default=None, help="training budget in optimizer steps")
    budget.add_argument("--max-minutes", type=float, default=None,
                        help="training budget in minutes of the training loop (loading and evaluation excluded); "
                             "the learning-rate schedule runs over that time")
    budget.add_argument("--epochs", type=float, default=1.0, help="budget in passes over the data (default 1)")
    p.add_argument("--lr-weight", type=float, default=None, help="learning rate of the latent weights")
    p.add_argument("--lr-scale", type=float, default=None, help="learning rate of scales and router")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None,
                   help="warm-up fraction of the steps (of the time, with --max-minutes)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=None, help="weight of the hidden-state term")
    p.add_argument("--kl-reduction", choices=["token", "batchmean"], default=None)
    p.add_argument("--hidden-norm", choices=["teacher", "none"], default=None)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--train-norms", action="store_true",
                   help="also train the RMSNorm/LayerNorm weights (at --lr-scale)")
    p.add_argument("--router-init-std", type=float, default=0.02, help="std of the routers' normal init")
    p.add_argument("--expert-init-noise", type=float, default=0.0,
                   help="relative std of each expert's initial scales around the SVD's (default 0: all experts equal, "
                        "as in the paper, so the router's gradient starts at zero)")
    p.add_argument("--ste-clip", type=float, default=1.0, help="sign gradient passes where |w| <= this")
    p.add_argument("--blockwise", type=float, default=None,
                   help="fraction of the budget trained block by block first (each student block computes from the "
                        "teacher's input to it), then end to end (default: the recipe's, 0.25; --compile needs 0)")
    p.add_argument("--blockwise-anneal", type=float, default=0.0,
                   help="fraction of the budget after the block-wise one over which each block's input moves "
                        "linearly from the teacher's to its own predecessor's output (default 0: at once)")
    p.add_argument("--compile", nargs="?", const="all", default="none", choices=["none", "teacher", "all"],
                   help="torch.compile the teacher (~30 s, +13 %% tokens/s measured at E=4) or, bare or 'all', the "
                        "student too (for long runs: compilation takes minutes)")
    p.add_argument("--bf16-compute", action="store_true",
                   help="one process: frozen student parameters in bf16, so activations are bf16 as under FSDP2 "
                        "(~30 %% less activation memory, ~10 %% more tokens/s; perplexity within noise in one "
                        "measured pair)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="one process on a GPU: replay each step's forward and backward as a CUDA graph, so the host "
                        "does not launch its kernels one by one (needs no --compile and no checkpointing)")
    p.add_argument("--cache-teacher", action=argparse.BooleanOptionalAction, default=False,
                   help="one process: run the teacher once over all training blocks before the first step and keep "
                        "its hidden states on the device (SmolLM2, 0.62 M tokens: 23 GB), so no step runs it; where "
                        "the device has no room, in page-locked host memory, each step's blocks copied over ahead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute blocks in backward (default: on a GPU only where the run would not fit without)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="under torchrun / accelerate launch: ddp copies both models to every GPU, fsdp shards them "
                        "(FSDP2); auto: ddp where the run fits one GPU (binarymos plan), else fsdp")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint: every option left out takes the run's "
                        "value; options that change what is trained must match it")
    _add_eval_args(p, "")
    p.set_defaults(func=_cmd_train)

    p = verbs.add_parser("eval", help="perplexity by the field's protocol")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, directory (a run's model/ too), .gguf or alias")
    _add_data_dir(p)
    _add_eval_args(p, "wikitext2,c4")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--tasks", type=_csv, default=[],
                   help="zero-shot lm-eval tasks, e.g. piqa,hellaswag or paper (boolq, piqa, hellaswag, winogrande, "
                        "arc_easy, arc_challenge) "
                        "(perplexity is then skipped unless --ppl is given)")
    p.add_argument("--task-path", default=None, help="a folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="evaluate only the first N examples of each task")
    p.add_argument("--sign", action="store_true", help="evaluate the static sign baseline of the model instead")
    p.set_defaults(func=_cmd_eval, ppl=None)

    p = verbs.add_parser("pack", help="write a real 1-bit model directory (signs 8 per byte, 16-bit scales)")
    p.add_argument("source", help="a run directory, a trained model directory, or any model to binarize now")
    p.add_argument("--out", required=True, help="the packed directory to write")
    p.add_argument("--num-experts", "-E", type=_int_at_least(1), default=None,
                   help="for a model binarized now: scaling experts (default 4; 1 = OneBit)")
    p.add_argument("--method", default=None, choices=["mos", "sign"],
                   help="for a model binarized now: mos (default) or the static sign baseline")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="the 16-bit tensors' type")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_pack)

    p = verbs.add_parser("footprint", help="bytes of a packed directory, or computed for a model config")
    p.add_argument("directory", nargs="?", default=None, help="a packed (or any safetensors) model directory")
    p.add_argument("--config", default=None,
                   help="a config.json, a model directory, or llama-7b, llama-13b, llama-2-7b, llama-2-13b, "
                        "llama-3-8b, mistral-7b, qwen2.5-7b, qwen2.5-14b, llama-2-70b")
    p.add_argument("--num-experts", "-E", type=_int_at_least(1), default=None,
                   help="BinaryMoS experts (default: the pack's, or 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_footprint)

    p = verbs.add_parser("plan", help="memory per GPU of a (multi-GPU) distillation run, and whether it fits")
    p.add_argument("--config", required=True, help="a built-in name (as for footprint), a config.json or a directory")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the run")
    p.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp",
                   help="how the GPUs share the run (train --strategy): fsdp shards the student and teacher, "
                        "ddp gives each GPU all of it")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-batch (--batch-size of train)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (--grad-accum of train)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB (10^9 bytes) or 80GiB")
    p.add_argument("--num-experts", "-E", type=_int_at_least(1), default=4)
    p.add_argument("--cache-tokens", type=int, default=0,
                   help="with train --cache-teacher: the training tokens (blocks x seq-len) whose teacher outputs "
                        "train keeps: on the GPU, or in host memory where they do not fit beside the run "
                        "(default 0: no cache)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_plan)

    p = verbs.add_parser("generate", help="continue a prompt with a packed (or any) model")
    p.add_argument("model", help="a packed directory (or any model binarymos eval takes)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--temperature", type=_finite, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=_finite, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="on the CPU: the packed layers' byte-table lookups through "
                   "torch.compile (needs a C++ compiler, ~5 s once; as BINARYMOS_CPU_COMPILE=1)")
    p.set_defaults(func=_cmd_generate)

    p = verbs.add_parser("compare", help="several methods at one budget (tokens or minutes): perplexity, tokens, "
                                        "minutes, bytes")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local directory, .gguf file or smollm2-135m")
    p.add_argument("--methods", default="fp,sign,onebit,mos2,mos4,mos8",
                   help="fp, sign (no training), onebit (E=1), mosN (BinaryMoS, N experts); "
                        "default: all of the paper's")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-tokens", type=int, help="training budget of every trained method, in tokens")
    budget.add_argument("--max-minutes", type=float,
                        help="training budget of every trained method, in minutes of its training loop")
    p.add_argument("--data", default=DEFAULT_DATA, help="training text, as for train (teacher, teacher+c4_wiki ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help='further train options for every run, e.g. "--recipe paper"')
    _add_data_dir(p)
    _add_eval_args(p, "wikitext2,c4")
    p.add_argument("--device", default=None, help="cpu or cuda for every job (default: cuda if available)")
    p.add_argument("--parallel", type=int, default=None, help="jobs at once (default: one per --gpus, else 1)")
    p.add_argument("--threads", type=int, default=4, help="OMP_NUM_THREADS of each job (default 4)")
    p.add_argument("--gpus", default=None, help="GPU ids to spread the jobs over, e.g. 0,1,2,3 (one job each)")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds; jobs still running then are killed")
    p.add_argument("--out", default="runs/compare", help="directory of the runs, compare.json and compare.md")
    p.set_defaults(func=_cmd_compare)

    p = verbs.add_parser("analyze", help="PNGs of a trained run: gating scores, token-adaptive scales, loss curves")
    p.add_argument("run", help="a run directory (or a trained model directory)")
    p.add_argument("--out", required=True, help="directory for gates.png, scales.png, loss.png, analyze.json")
    p.add_argument("--layers", default=None,
                   help="block indices (each block's first binarized layer) or patterns of layer names, "
                        "comma-separated (default: first, middle and last block)")
    p.add_argument("--text", default=None, help="the sentence to route (default: a sentence about Paris)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the PNGs (default); --no-plots writes analyze.json alone, without matplotlib")
    p.set_defaults(func=_cmd_analyze)

    p = verbs.add_parser("bench", help="GPU benchmarks: one layer against fp16 cuBLAS, and end-to-end decoding")
    p.add_argument("--out", default="bench", help="directory for linear_latency.md and decode.md (default: bench)")
    p.set_defaults(func=_cmd_bench)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the command
        self.exit(2, f"binarymos: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", False):
        args.options_given = _train_options_given(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would bury our own progress and errors
        _check_device(getattr(args, "device", None))
        args.func(args)
    except KeyboardInterrupt:
        print("binarymos: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  bad input of any kind (a damaged file can fail deep in a library)
        if os.environ.get("BINARYMOS_DEBUG"):  # the full traceback, for bug reports
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not message or not isinstance(err, (ValueError, OSError, RuntimeError, ImportError)):
            # raised deep in a library (a KeyError from a damaged header, say): name it, and where to look
            message = f"{type(err).__name__}{': ' if message else ''}{message} (BINARYMOS_DEBUG=1 shows where)"
        code = getattr(err, "exit_code", 2)  # a run stopped by SIGTERM is not an error: 143, as a killed process
        print(f"binarymos: {'error: ' if code == 2 else ''}{message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
