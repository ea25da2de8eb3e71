"""The `binarymos` command: one verb per step of the workflow."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import DEFAULT_DATA
from .models import DEFAULT_MODEL


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _add_eval_args(p: argparse.ArgumentParser, default_sets: str) -> None:
    p.add_argument("--ppl", type=_csv, default=_csv(default_sets),
                   help=f"perplexity sets, comma-separated: wikitext2,c4 (default: {default_sets or 'none'})")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows of each set")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="local copy of the text laid out like shared/data (default: $BINARYMOS_DATA_DIR)")


def _cmd_train(args) -> None:
    from .train import TrainConfig, train

    names = [k for k in vars(TrainConfig()) if k in vars(args)]
    cfg = TrainConfig(**{k: getattr(args, k) for k in names})
    if args.ppl:
        _report(cfg, args, lambda: train(cfg))
    else:
        train(cfg)
    print(f"saved {Path(cfg.out) / 'model'}")


def _report(cfg, args, run_training) -> None:
    """Perplexity of the full-precision model, the static sign baseline, the student before and after."""
    import copy

    from .convert import BinaryMoSConfig, binarize
    from .eval import perplexity
    from .models import load_model

    teacher, tokenizer = load_model(cfg.model)
    evaluate = lambda m: {s: perplexity(m, tokenizer, s, args.eval_seq_len, args.eval_windows, cfg.data_dir)
                          for s in args.ppl}
    rows = {"full precision": evaluate(teacher),
            "static sign": evaluate(binarize(copy.deepcopy(teacher), BinaryMoSConfig(method="sign")))}
    if not cfg.resume:
        init = binarize(copy.deepcopy(teacher), BinaryMoSConfig(num_experts=cfg.num_experts))
        rows[f"{_label(cfg)} before training"] = evaluate(init)
        del init
    del teacher
    student = run_training()
    rows[f"{_label(cfg)} trained"] = evaluate(student.float())
    _print_table(rows, args.ppl)
    (Path(cfg.out) / "results.json").write_text(json.dumps(rows, indent=2))


def _label(cfg) -> str:
    return "OneBit (E=1)" if cfg.num_experts == 1 else f"BinaryMoS (E={cfg.num_experts})"


def _print_table(rows: dict[str, dict[str, float]], sets: list[str]) -> None:
    print("| model | " + " | ".join(f"{s} ppl" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[s]:,.2f}" for s in sets) + " |")


def _cmd_eval(args) -> None:
    from .eval import perplexity
    from .models import load_model

    import torch

    model, tokenizer = load_model(args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = {args.model: {s: perplexity(model, tokenizer, s, args.eval_seq_len, args.eval_windows, args.data_dir)
                         for s in args.ppl}}
    _print_table(rows, args.ppl)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binarymos", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="binarize a model and distil it from the original")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local directory, .gguf file or smollm2-135m")
    p.add_argument("--data", default=DEFAULT_DATA, help="wikitext2, c4, c4_wiki, calib or .txt/.jsonl/.json.gz files")
    _add_data_dir(p)
    p.add_argument("--out", default="runs/binarymos", help="run directory (checkpoint, log, model)")
    p.add_argument("--method", default="mos", choices=["mos"], help="mos: BinaryMoS (E=1 is OneBit)")
    p.add_argument("--num-experts", "-E", type=int, default=4, help="scaling experts per layer (1 = OneBit)")
    p.add_argument("--recipe", default="default", choices=["default", "paper"],
                   help="default: ours, tuned for small budgets; paper: the authors' exact setting")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-tokens", type=int, default=None, help="training budget in tokens")
    budget.add_argument("--max-steps", type=int, default=None, help="training budget in optimizer steps")
    budget.add_argument("--epochs", type=float, default=1.0, help="budget in passes over the data (default 1)")
    p.add_argument("--lr-weight", type=float, default=None, help="learning rate of the latent weights")
    p.add_argument("--lr-scale", type=float, default=None, help="learning rate of scales and router")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the steps")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=None, help="weight of the hidden-state term")
    p.add_argument("--kl-reduction", choices=["token", "batchmean"], default=None)
    p.add_argument("--hidden-norm", choices=["teacher", "none"], default=None)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_eval_args(p, "")
    p.set_defaults(func=_cmd_train)

    p = verbs.add_parser("eval", help="perplexity by the field's protocol")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, directory (a run's model/ too), .gguf or alias")
    _add_data_dir(p)
    _add_eval_args(p, "wikitext2,c4")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("binarymos: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        if os.environ.get("BINARYMOS_DEBUG"):  # the full traceback, for bug reports
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"binarymos: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
