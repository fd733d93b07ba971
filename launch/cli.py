"""`sparseforge` command line: validate a recipe, print its plan, spawn the ranks."""
from __future__ import annotations

import argparse
import os
import re
import sys

from launch.hf import COMMANDS as HF_COMMANDS, add_hf_commands
from launch.slurm import add_slurm_args, check_launcher_args
from launch.spawn import RDZV_BACKENDS, split_endpoint
from trainer.adapt.sources import absolute_source
from trainer.config import ConfigError
from trainer.recipe import load_config, save_config


LAUNCHERS = ("torchrun", "slurm", "deepspeed")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)


def _add_node_args(p: argparse.ArgumentParser) -> None:
    """Multi-node: a static rendezvous (each node told its rank) or c10d (ranks assigned)."""
    p.add_argument("--node-rank", type=int, default=None, help="static rendezvous: this node's rank (default 0)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (static), or of the c10d endpoint")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--rdzv-backend", choices=RDZV_BACKENDS, default=None,
                   help="static (default) or c10d (default when --rdzv-endpoint is given)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="c10d: where the rendezvous store runs (one of the nodes; default master addr:port)")
    p.add_argument("--rdzv-id", default=None,
                   help="c10d: job id, the same on every node (default: the run directory's name)")
    p.add_argument("--local-addr", default=None,
                   help="c10d: this node's address for the other nodes (default: the one facing the endpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate a recipe and train (or --dry-run: print the plan)")
    _add_recipe_args(run)
    _add_node_args(run)
    run.add_argument("--run-dir", default=None, help="default: runs/<recipe name>")
    run.add_argument("--resume", default=None, help="checkpoint directory to start from "
                     "(default: the latest one in the run directory, if any)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, spawn nothing")
    run.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                     help="torchrun: start the ranks here; slurm: write RUN_DIR/slurm/job.sbatch (see below); "
                          "deepspeed: the deepspeed launcher (here, or the nodes of --hostfile over ssh)")
    run.add_argument("--hostfile", default=None, help="--launcher deepspeed: MPI-style hostfile ('HOST slots=N' "
                     "lines); the first --nnodes hosts run --nproc-per-node ranks each")
    add_slurm_args(run)
    validate = sub.add_parser("validate", help="check a recipe against a world size and exit")
    _add_recipe_args(validate)
    add_hf_commands(sub)
    prep = sub.add_parser("prepare-data", help="tokenize a recipe's corpus once into memory-mapped shards (or write "
                                                "a DiT recipe's images as a memory-mapped array); train with "
                                                "data.source=OUT")
    prep.add_argument("recipe", help="YAML recipe whose data section (and model, for images) says what to prepare")
    prep.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set data.source=corpus/ data.max_bytes=0")
    prep.add_argument("--out", required=True, help="directory to write (a rerun of an unfinished one resumes it)")
    prep.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: CPU count, at most 16)")
    prep.add_argument("--shard-tokens", type=int, default=None,
                      help="tokens per shard of the training split (default 2**28)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge = sub.add_parser("merge-peft", help="fold a PEFT checkpoint's adapters into its base weights: "
                                              "an ordinary full checkpoint (a base for other runs)")
    merge.add_argument("checkpoint", help="checkpoint directory step_XXXXXXXX of a PEFT run (lora, esft, full)")
    merge.add_argument("--out", required=True, help="checkpoint directory to write (named step_XXXXXXXX), or a "
                       "run directory whose checkpoints/step_XXXXXXXX (the same step) it becomes")
    return parser


def _fail(message: str) -> int:
    print(f"sparseforge: error: {message}", file=sys.stderr)
    return 2


def _rdzv_backend(args: argparse.Namespace) -> str:
    chosen = getattr(args, "rdzv_backend", None)
    return chosen or ("c10d" if getattr(args, "rdzv_endpoint", None) else "static")


def _check_node_args(args: argparse.Namespace) -> None:
    for name in ("nproc_per_node", "nnodes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    node_rank = getattr(args, "node_rank", None)
    if node_rank is not None and _rdzv_backend(args) == "c10d":
        raise ConfigError("--node-rank is for --rdzv-backend static; c10d assigns the node ranks")
    if not 0 <= (node_rank or 0) < args.nnodes:
        raise ConfigError(f"--node-rank {node_rank} is outside 0..{args.nnodes - 1}")
    endpoint = getattr(args, "rdzv_endpoint", None)
    check_launcher_args(args)
    _check_deepspeed_args(args)
    # Only a torchrun started from here needs node 0's address; a plan and an sbatch script do not.
    spawns_here = getattr(args, "command", "run") == "run" and not getattr(args, "dry_run", False) \
        and getattr(args, "launcher", "torchrun") == "torchrun"
    if spawns_here and args.nnodes > 1 and not getattr(args, "master_addr", None) and not endpoint:
        raise ConfigError("--nnodes > 1 needs --master-addr (the address of node 0) "
                          "or --rdzv-endpoint HOST:PORT (c10d)")
    if endpoint and _rdzv_backend(args) == "static":
        raise ConfigError("--rdzv-endpoint is for --rdzv-backend c10d; static uses --master-addr/--master-port")
    if endpoint:
        try:
            host, _ = split_endpoint(endpoint)
        except ValueError:
            host = ""
        if not host:
            raise ConfigError(f"--rdzv-endpoint: expected HOST:PORT, got {endpoint!r}")


def _check_deepspeed_args(args: argparse.Namespace) -> None:
    """--hostfile only with --launcher deepspeed; with it, several nodes come from a hostfile."""
    from launch.spawn import hostfile_problem

    hostfile = getattr(args, "hostfile", None)
    if getattr(args, "launcher", "torchrun") != "deepspeed":
        if hostfile:
            raise ConfigError("--hostfile is an option of --launcher deepspeed")
        return
    given = [name for name in ("node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "local_addr")
             if getattr(args, name, None) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')}: not with --launcher deepspeed (its runner starts "
                          f"every node of --hostfile; node 0 is --master-addr or the first host)")
    if args.nnodes > 1 and not hostfile and not getattr(args, "dry_run", False):
        raise ConfigError("--launcher deepspeed with --nnodes > 1 needs --hostfile (the nodes it starts over ssh)")
    problem = hostfile and hostfile_problem(hostfile, args.nnodes, args.nproc_per_node)
    if problem:
        raise ConfigError(problem)
    if not getattr(args, "dry_run", False):
        from launch.preflight import check_deepspeed_installed

        check_deepspeed_installed("--launcher deepspeed")


def cmd_run(args: argparse.Namespace) -> int:
    from launch.plan_report import format_plan
    from launch.preflight import check_sources, preflight, starts_fresh
    from launch.spawn import NodeArgs, spawn_deepspeed, spawn_torchrun

    _check_node_args(args)
    world_size = args.nproc_per_node * args.nnodes
    overrides = [item for group in args.overrides for item in group]
    cfg = load_config(args.recipe, overrides, world_size=world_size)
    if args.launcher == "deepspeed" and cfg.train.max_restarts:
        raise ConfigError("train.max_restarts: restarts are torchrun's; the deepspeed launcher has none "
                          "(use --launcher torchrun, or rerun: it resumes)")
    run_dir = os.path.abspath(args.run_dir or cfg.train.run_dir or
                              os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0]))
    cfg.train.run_dir = run_dir
    # A resumed run (or a prune rerun, which trains on from its compressed checkpoint) no longer
    # reads its weight sources; checked as the recipe names them, before they are made absolute.
    check_sources(cfg, fresh=starts_fresh(run_dir, args.resume))
    if cfg.model.upcycle_from:  # the ranks may start in another working directory
        cfg.model.upcycle_from = os.path.abspath(cfg.model.upcycle_from)
    if cfg.model.init_from:
        cfg.model.init_from = absolute_source(cfg.model.init_from)
    if cfg.peft.base:  # also what the run's checkpoints name as their base
        cfg.peft.base = absolute_source(cfg.peft.base)
    if cfg.peft.init_adapter:
        cfg.peft.init_adapter = os.path.abspath(cfg.peft.init_adapter)
    if cfg.prune.method != "none":  # the ranks, the checkpoints and the report name them absolute
        p = cfg.prune
        p.checkpoint, p.reference = os.path.abspath(p.checkpoint), p.reference and os.path.abspath(p.reference)
        p.ties_checkpoints = [os.path.abspath(path) for path in p.ties_checkpoints]
    if args.dry_run:
        print(format_plan(cfg, world_size, args.nproc_per_node))
        return 0
    if args.launcher == "slurm":
        from launch.slurm import run_slurm

        return run_slurm(cfg, args, run_dir)
    preflight(cfg, run_dir, args.resume)
    config_path = os.path.join(run_dir, "config.yaml")
    save_config(cfg, config_path)  # every node may write it at once on a shared file system
    print(f"run directory: {run_dir}", flush=True)
    nodes = NodeArgs(args.nproc_per_node, args.nnodes, args.node_rank or 0, args.master_addr, args.master_port,
                     _rdzv_backend(args), args.rdzv_endpoint, args.rdzv_id or _default_rdzv_id(run_dir),
                     args.local_addr, cfg.train.max_restarts)
    if args.launcher == "deepspeed":
        resume = args.resume and os.path.abspath(args.resume)
        code = spawn_deepspeed(nodes, config_path, run_dir, resume, args.hostfile and os.path.abspath(args.hostfile))
    else:
        code = spawn_torchrun(nodes, config_path, run_dir, args.resume)
    if code != 0:
        print(f"sparseforge: training exited with code {code}; see the rank messages above", file=sys.stderr)
    return code


def _default_rdzv_id(run_dir: str) -> str:
    """The run directory's name: the same on every node of a shared file system."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(run_dir.rstrip(os.sep))) or "sparseforge"


def cmd_validate(args: argparse.Namespace) -> int:
    _check_node_args(args)
    overrides = [item for group in args.overrides for item in group]
    cfg = load_config(args.recipe, overrides, world_size=args.nproc_per_node * args.nnodes)
    from launch.preflight import check_sources

    check_sources(cfg)  # the checkpoints and directories it starts from
    print(f"{args.recipe}: ok")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    import time

    from trainer.prepared import looks_prepared

    overrides = [item for group in args.overrides for item in group]
    cfg = load_config(args.recipe, overrides)
    if args.num_proc is not None and args.num_proc < 1:
        raise ConfigError(f"--num-proc must be >= 1, got {args.num_proc}")
    if cfg.data.mix:
        raise ConfigError("data.mix: prepare each dataset of the mixture on its own (--set data.mix={} "
                          "data.source=SOURCE), then name the outputs in data.mix")
    if looks_prepared(cfg.data.source.strip()):
        raise ConfigError(f"data.source: {cfg.data.source} is already a prepared directory")
    t0 = time.perf_counter()
    if cfg.model.family == "dit":
        from trainer.diffusion.prepare_images import prepare_images

        manifest = prepare_images(cfg, args.out, not args.no_progress)
    else:
        from trainer.lm.prepare import DEFAULT_SHARD_TOKENS, prepare_text

        manifest = prepare_text(cfg, args.out, args.num_proc, args.shard_tokens or DEFAULT_SHARD_TOKENS,
                                not args.no_progress)
    seconds = time.perf_counter() - t0
    if manifest["kind"] == "images":
        counts = ", ".join(f"{split} {info['images']:,} images" for split, info in manifest["splits"].items())
        counts += f" of {manifest['in_channels']}x{manifest['image_size']}x{manifest['image_size']}"
    else:
        counts = ", ".join(f"{split} {info['tokens']:,} tokens / {info['documents']:,} documents"
                           for split, info in manifest["splits"].items())
    print(f"prepared {os.path.abspath(args.out)}: {counts} ({manifest['dtype']}) in {seconds:.1f} s; "
          f"train with --set data.source={os.path.abspath(args.out)}")
    return 0


def cmd_merge_peft(args: argparse.Namespace) -> int:
    from trainer.adapt.peft import merge_peft

    _, summary = merge_peft(args.checkpoint, args.out)
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "validate": cmd_validate, "merge-peft": cmd_merge_peft, "prepare-data": cmd_prepare_data, **HF_COMMANDS}[args.command](args)
    except ConfigError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
