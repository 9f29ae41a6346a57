"""The `ampray` command line."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from ampray.orchestrator.local import LocalRunConfig, run_local

    try:
        run = LocalRunConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             dtype=args.dtype, adaptive=not args.no_adaptive, seed=args.seed, device=args.device)
    except ValueError as err:
        print(f"ampray train: {err}", file=sys.stderr)
        return 2
    run_local(run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ampray", description="Mixed-precision training on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a built-in model on the built-in data")
    train.add_argument("--model", default="mlp", help="mlp | cnn | gpt")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--dtype", default="auto", help="auto | fp16 | bf16 | fp32")
    train.add_argument("--no-adaptive", action="store_true", help="plain trainer, no adaptation")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu | cuda (default: best available)")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
