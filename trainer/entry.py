"""Entry point of every rank (`python -m trainer.entry`), spawned by the launcher via torchrun."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from trainer.config import ConfigError
from trainer.recipe import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.entry")
    parser.add_argument("--config", required=True, help="resolved config.yaml written by the launcher")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", default=None, help="checkpoint directory to start from")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        from trainer.loop import train  # heavy imports after the config is known to be sound

        train(cfg, args.run_dir, args.resume)
    except ConfigError as e:
        print(f"rank {rank}: config error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # noqa: BLE001 - one line naming the rank, then the traceback
        from trainer.checkpoint_save import SaveFailed

        if isinstance(e, SaveFailed):  # the line says it all (every rank has it: rank 0 tells)
            if rank == 0:
                print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
            return 1
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
