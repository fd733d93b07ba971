"""What a fresh run starts from, read into this rank's share of the materialised model:
model.upcycle_from (a dense checkpoint of ours) or model.init_from (a Hugging Face directory or a
checkpoint of ours). A resumed run reads its own checkpoint instead (trainer/checkpoint.py); a PEFT
run's base is trainer/adapt/peft.py's."""
from __future__ import annotations

from torch import nn

from trainer.config import Config


def load_sources(model: nn.Module, cfg: Config, mesh, resume_path: str | None) -> list[str]:
    """Fill this rank's share of `model` from the run's source; returns lines for the log.
    Collective: every rank calls it."""
    if resume_path is not None:
        return []
    if cfg.model.upcycle_from:
        from trainer.adapt.upcycle import upcycle_into

        return [upcycle_into(model, cfg.model.upcycle_from, granularity=cfg.model.upcycle_granularity,
                             seed=cfg.train.seed, mesh=mesh)]
    if cfg.model.init_from:
        from trainer.adapt.hf_bridge import init_model_from

        return [init_model_from(model, cfg.model.init_from, cfg=cfg, mesh=mesh)]
    return []
