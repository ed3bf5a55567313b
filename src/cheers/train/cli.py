"""`cheers train CONFIG [key.sub=value ...] [--resume]`

CONFIG is a YAML file or the name of a packaged stage config (stage0_vae, stage1_align, stage2_pretrain,
stage3_pretrain, stage4_sft). Overrides use dotted keys and YAML values. One process by default; for DDP/FSDP2
launch the same command under torchrun, e.g.

    torchrun --nproc-per-node 2 -m cheers.train.cli stage2_pretrain distributed.strategy=fsdp2 ...

(`python -m cheers.train.cli` is the same command without the `cheers` entry point.)
"""

from __future__ import annotations

import argparse
import sys


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="stage YAML file, or a packaged stage name (e.g. stage1_align)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=3e-4 data.sources.0.path=data/und.jsonl steps=100")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in <output_dir>/ckpt (fresh start if none)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--export-only", action="store_true",
                   help="load the latest checkpoint of <output_dir> and write the official-format export")
    p.set_defaults(func=run_train)
    return p


def add_train_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `train` on an argparse subparsers object (the `cheers` CLI)."""
    p = subparsers.add_parser("train", help="train a stage from a YAML config (single process or torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from cheers.train.ckpt import TrainCheckpointError
    from cheers.train.data import DataError
    from cheers.train.engine import NonFiniteLossError, make_trainer, train
    from cheers.train.settings import TrainConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except TrainConfigError as err:
        print(f"cheers train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        if args.export_only:
            from cheers.train.distributed import teardown

            trainer = make_trainer(cfg, resume=True)
            try:
                if trainer.resume_from is None:
                    print(f"cheers train: no checkpoint under {cfg.output_dir}/ckpt to export", file=sys.stderr)
                    return 2
                path = trainer.export()
                print(path)
            finally:
                trainer.close()
                teardown()
            return 0
        train(cfg, resume=args.resume)
    except (TrainConfigError, TrainCheckpointError, DataError) as err:
        print(f"cheers train: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"cheers train: {err}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="cheers train", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
