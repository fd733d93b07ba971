"""The language-modelling task: next-token cross entropy on text (trainer/lm/data.py).

A task supplies what the loop (trainer/loop.py) needs of a model family:
    data                         train_batches() / val_batches(n) / state_dict() for this dp rank
    micro_batch_loss(model, b)   mean loss of one micro batch (the loop scales and backpropagates)
    eval_loss(model, b, i)       deterministic loss of validation batch i
    evaluate_extra(...)          family-specific evaluation after the validation loss (DiT: samples)
    pipeline_args(b)             (first stage inputs, loss target) of a micro batch (never with
                                 data.document_mask: stages pass only hidden states), and
    pipeline_loss_fn             (last stage output, target) -> loss, for pipeline parallelism
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.config import Config


def document_ids(inputs_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document id of every token of packed windows (trainer/lm/data.py: each document's tokens,
    then eos): the count of eos tokens strictly before it, so an eos belongs to the document it
    ends and the next token starts a new one. Windows start anywhere, so id 0 may be a tail."""
    is_eos_BS = (inputs_BS == eos_id).to(torch.int32)
    return torch.cumsum(is_eos_BS, dim=1) - is_eos_BS


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats per token); logits are upcast so bf16 runs agree."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


def compiled_loss(par) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """lm_loss, compiled under parallel.compile: log-softmax and gather fused, so the fp32
    log-probabilities (4 bytes x tokens x vocab) are not stored for backward (6 GiB at 32k tokens
    and a 50k vocabulary, docs/gpu.md)."""
    return torch.compile(lm_loss, backend=par.compile_backend) if par.compile else lm_loss


class LMTask:
    def __init__(self, cfg: Config, mesh, device: torch.device):
        from trainer.lm.data import build_text_data
        from trainer.lm.streaming import build_streaming_data

        self.cfg, self.device = cfg, device
        build = build_streaming_data if cfg.data.streaming else build_text_data
        self.data = build(cfg.data, cfg.train.micro_batch_size, mesh.dp_rank, mesh.dp, cfg.train.seed)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.data.vocab_size}, data.tokenizer={cfg.data.tokenizer})")
        self.pipeline_loss_fn = lm_loss
        self.loss_fn = compiled_loss(cfg.parallel)
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.data.seq_len

    def describe_data(self) -> str:
        if self.cfg.data.streaming:  # the size is unknown; the position is per rank
            return f"streaming {self.cfg.data.source}"
        summary = getattr(self.data, "summary", None)
        return f"{self.data.num_train_tokens:,} training tokens" + (f": {summary()}" if summary else "")

    def to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def micro_batch_loss(self, model, batch) -> torch.Tensor:
        inputs, targets = batch
        if not self.cfg.data.document_mask:
            return self.loss_fn(model(inputs), targets)
        return self.loss_fn(model(inputs, document_ids(inputs, self.data.tokenizer.eos_id)), targets)

    def eval_loss(self, model, batch, index: int) -> torch.Tensor:
        return self.micro_batch_loss(model, batch)

    def pipeline_args(self, batch, eval_index: int | None = None):
        inputs, targets = batch
        return (inputs,), targets

    def pop_metrics(self) -> dict[str, float]:
        return self.data.metrics()  # a mixture's realised shares (trainer/lm/mixture.py)

    def evaluate_extra(self, trainer, log) -> dict:
        return {}

    def final_line(self, step: int, val_loss: float, extra: dict) -> str:
        return (f"final: step {step}, val loss {val_loss:.4f} nats/token (ppl {math.exp(val_loss):.2f}); "
                f"unigram entropy of the corpus {self.data.unigram_entropy_nats:.4f} nats/token")

    @property
    def reference_loss(self) -> float | None:
        return self.data.unigram_entropy_nats
