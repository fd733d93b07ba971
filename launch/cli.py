"""`sparseforge` command line: validate a recipe, print its plan, spawn the ranks."""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config import ConfigError, load_config, save_config


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate a recipe and train (or --dry-run: print the plan)")
    _add_recipe_args(run)
    run.add_argument("--node-rank", type=int, default=0)
    run.add_argument("--master-addr", default=None)
    run.add_argument("--master-port", type=int, default=None)
    run.add_argument("--run-dir", default=None, help="default: runs/<recipe name>")
    run.add_argument("--resume", default=None, help="checkpoint directory to start from "
                     "(default: the latest one in the run directory, if any)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, spawn nothing")
    validate = sub.add_parser("validate", help="check a recipe against a world size and exit")
    _add_recipe_args(validate)
    return parser


def _fail(message: str) -> int:
    print(f"sparseforge: error: {message}", file=sys.stderr)
    return 2


def _check_node_args(args: argparse.Namespace) -> None:
    for name in ("nproc_per_node", "nnodes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    node_rank = getattr(args, "node_rank", 0)
    if not 0 <= node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {node_rank} is outside 0..{args.nnodes - 1}")
    if args.nnodes > 1 and not getattr(args, "master_addr", None):
        raise ConfigError("--nnodes > 1 needs --master-addr (the address of node 0)")


def cmd_run(args: argparse.Namespace) -> int:
    from launch.plan import format_plan
    from launch.preflight import preflight
    from launch.spawn import NodeArgs, spawn_torchrun

    _check_node_args(args)
    world_size = args.nproc_per_node * args.nnodes
    overrides = [item for group in args.overrides for item in group]
    cfg = load_config(args.recipe, overrides, world_size=world_size)
    run_dir = os.path.abspath(args.run_dir or cfg.train.run_dir or
                              os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0]))
    cfg.train.run_dir = run_dir
    if cfg.model.upcycle_from:  # the ranks may start in another working directory
        cfg.model.upcycle_from = os.path.abspath(cfg.model.upcycle_from)
    if args.dry_run:
        print(format_plan(cfg, world_size, args.nproc_per_node))
        return 0
    preflight(cfg, run_dir, args.resume)
    config_path = os.path.join(run_dir, "config.yaml")
    save_config(cfg, config_path)
    print(f"run directory: {run_dir}", flush=True)
    nodes = NodeArgs(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    code = spawn_torchrun(nodes, config_path, run_dir, args.resume)
    if code != 0:
        print(f"sparseforge: training exited with code {code}; see the rank messages above", file=sys.stderr)
    return code


def cmd_validate(args: argparse.Namespace) -> int:
    _check_node_args(args)
    overrides = [item for group in args.overrides for item in group]
    load_config(args.recipe, overrides, world_size=args.nproc_per_node * args.nnodes)
    print(f"{args.recipe}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "validate": cmd_validate}[args.command](args)
    except ConfigError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
