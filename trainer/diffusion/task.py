"""The diffusion task: class-conditional image generation with a DiT (the task interface is
described in trainer/lm/task.py): DDPM / v-prediction / flow matching on images
(trainer/diffusion/image_data.py, objectives.py), evaluated by sampling with the EMA weights and
scoring the samples offline (samplers.py, image_eval.py).
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from trainer.config import Config

# The Fréchet distances compare the samples with at most this many training images (a fixed
# subset beyond): the whole split of a small set, a bounded float copy of a prepared large one.
REFERENCE_IMAGES = 10_000


class DiffusionTask:
    """Class-conditional image generation with a DiT.

    Training: x0, labels -> t (uniform, or logit-normal for flow), noise -> x_t -> model(x_t, time,
    labels) -> the objective's loss (with the learned-variance VLB term for DDPM + learn_sigma).
    Timesteps and noise come from generators keyed by each image's place in the data stream
    (`_draw`); label dropout from the rank's torch RNG stream, which checkpoints save and restore.
    Evaluation: the validation loss at fixed seeds, then `diffusion.num_samples` class-balanced
    samples with the EMA weights, guided with `diffusion.cfg_scale`, drawn by every dp rank for its
    share (expert parallelism needs every rank in each forward), gathered, and scored on rank 0:
    conditional accuracy and Fréchet distance in the feature space of a small classifier trained
    once on the training images (cached), plus a PNG grid in RUN_DIR/plots and wandb.
    """

    def __init__(self, cfg: Config, mesh, device: torch.device):
        from trainer.diffusion.objectives import build_objective
        from trainer.diffusion.image_data import build_image_data

        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.data = build_image_data(cfg.data, cfg.model, cfg.train.micro_batch_size, mesh.dp_rank, mesh.dp,
                                     cfg.train.seed)
        self.objective = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        m = cfg.model
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * (m.image_size // m.patch_size) ** 2
        self._sums: dict[str, float] = {}
        self._count = 0

    def describe_data(self) -> str:
        return f"{self.data.num_train:,} training images, {self.data.num_val:,} validation images"

    def to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def _positions(self, eval_index: int | None) -> tuple[str, range]:
        """Where this rank's rows of the current batch sit: training rows at their positions in the
        sample stream (trainer/sampler.py, the batch just taken), evaluation batch i the i-th of
        the validation pass, where rank r holds rows [r·B, (r+1)·B)."""
        sampler = self.data.sampler
        if eval_index is None:
            return "train", sampler.last_positions
        first = eval_index * sampler.global_batch_size + sampler.rank_rows.start
        return "eval", range(first, first + sampler.micro_batch_size)

    def _draw(self, x0: torch.Tensor, eval_index: int | None):
        """Timestep and noise of every image from a generator keyed by (seed, the image's global
        position in the batch stream): the first and the last pipeline stage draw the same ones
        without talking, resume needs no RNG state, and an image gets the same noise whatever the
        layout (dp size, accumulation, pipeline). Evaluation draws the same at every evaluation."""
        kind, positions = self._positions(eval_index)
        ts, noises = [], []
        for position in positions:
            key = hashlib.blake2b(f"{self.cfg.train.seed}/{kind}/{position}".encode(), digest_size=8).digest()
            g = torch.Generator(device=self.device).manual_seed(int.from_bytes(key, "little") >> 1)
            ts.append(self.objective.sample_t(1, generator=g, device=x0.device))
            noises.append(torch.randn(x0.shape[1:], generator=g, dtype=x0.dtype, device=x0.device))
        t, noise = torch.cat(ts), torch.stack(noises)
        return t, noise, self.objective.q_sample(x0, t, noise)

    def _loss_terms(self, model, batch, eval_index: int | None = None) -> dict[str, torch.Tensor]:
        x0, y = batch
        t, noise, x_t = self._draw(x0, eval_index)
        out = model(x_t, self.objective.model_time(t), y)
        return self.objective.loss(out.float(), x0, x_t, t, noise)

    def pipeline_args(self, batch, eval_index: int | None = None):
        """First-stage inputs (x_t, time, labels) and the loss target: x0, x_t, noise and t packed
        as channels of one tensor (the schedule splits one target tensor into microbatches)."""
        x0, y = batch
        t, noise, x_t = self._draw(x0, eval_index)
        t_plane = t.to(x0.dtype)[:, None, None, None].expand(-1, 1, *x0.shape[2:])
        return (x_t, self.objective.model_time(t), y), torch.cat([x0, x_t, noise, t_plane], dim=1)

    def pipeline_loss_fn(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        C = self.cfg.model.in_channels
        x0, x_t, noise, t = target[:, :C], target[:, C:2 * C], target[:, 2 * C:3 * C], target[:, 3 * C, 0, 0]
        if self.cfg.diffusion.objective != "flow":
            t = t.round().long()  # a diffusion timestep, exact in fp32 below 2^24
        return self.objective.loss(out.float(), x0, x_t, t, noise)["loss"].mean()

    def micro_batch_loss(self, model, batch) -> torch.Tensor:
        terms = self._loss_terms(model, batch)
        for k, v in terms.items():  # logged as diffusion/<term>, the mean since the last log step
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach().mean())
        self._count += 1
        return terms["loss"].mean()

    def eval_loss(self, model, batch, index: int) -> torch.Tensor:
        # The same timesteps and noise at every evaluation: comparable across steps and runs.
        return self._loss_terms(model, batch, eval_index=index)["loss"].mean()

    def pop_metrics(self) -> dict[str, float]:
        out = {f"diffusion/{k}": v / self._count for k, v in self._sums.items() if k != "loss"} if self._count else {}
        self._sums, self._count = {}, 0
        return out

    @torch.no_grad()
    def draw_samples(self, model, num_samples: int, sampler: str, steps: int, seed: int,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This dp rank's share of `num_samples` class-balanced samples (labels i % classes for the
        global indices i of the rank), with `model` as it is (the caller applies the EMA)."""
        from trainer.diffusion.samplers import sample

        m, d, mesh = self.cfg.model, self.cfg.diffusion, self.mesh
        per_rank = -(-num_samples // mesh.dp)
        first = mesh.dp_rank * per_rank
        labels = torch.arange(first, first + per_rank, device=self.device) % m.num_classes
        g = torch.Generator(device=self.device).manual_seed(seed * 1000 + mesh.dp_rank)
        shape = (per_rank, m.in_channels, m.image_size, m.image_size)
        x0, nfe = sample(model, self.objective, shape, labels, sampler, steps, cfg_scale=d.cfg_scale,
                         null_label=m.num_classes, generator=g, progress=progress)
        return x0.clamp(-1, 1), labels, nfe

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every dp rank's equally shaped tensor (in dp-rank order) on every rank."""
        if self.mesh.dp_group is None:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.mesh.dp)]
        dist.all_gather(parts, tensor.contiguous(), group=self.mesh.dp_group)
        return torch.cat(parts)

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Conditional accuracy and Fréchet distance to the training images (up to REFERENCE_IMAGES;
        rank 0 calls this)."""
        from trainer.diffusion.classifier import load_or_train_classifier
        from trainer.diffusion.image_eval import evaluate_samples

        classifier = load_or_train_classifier(self.data)
        real, _ = self.data.real_images(REFERENCE_IMAGES)
        result = evaluate_samples(samples.cpu(), labels.cpu(), classifier, real)
        scores = {"acc": float(result["acc"]), "fd": float(result["fd"])}
        # FID with Inception features only when its weights are on this machine (never downloaded).
        from trainer.diffusion.image_eval import find_inception_weights, inception_fid

        package, _, message = find_inception_weights()
        if package is not None:
            scores["fid"] = float(inception_fid(samples.cpu(), real))
        elif not getattr(self, "_told_no_inception", False):
            print(message, flush=True)  # once per run: what to install for FID
            self._told_no_inception = True
        return scores

    def evaluate_extra(self, trainer, log) -> dict:
        d, mesh = self.cfg.diffusion, self.mesh
        model = trainer.unwrapped_model
        model.eval()
        progress = mesh.is_main and self.cfg.logging.progress_bar
        # Under pipeline parallelism every rank of the pipeline runs the sampler in lockstep (same
        # noise: seeded by dp rank) and each model call goes through the stages.
        model_fn = trainer.pipeline.forward if trainer.pipeline is not None else model
        with trainer.ema.applied():
            samples, labels, nfe = self.draw_samples(model_fn, d.num_samples, d.sampler, d.sample_steps,
                                                     seed=self.cfg.train.seed, progress=progress)
        model.train()
        samples, labels = self.gather(samples), self.gather(labels)
        samples, labels = samples[:d.num_samples], labels[:d.num_samples]
        if not mesh.is_main:
            return {}
        from trainer.diffusion.image_eval import save_sample_grid

        scores = self.score(samples, labels)
        per_class = max(1, min(10, 100 // self.cfg.model.num_classes))  # a grid of at most ~100
        order = torch.cat([torch.nonzero(labels == c).flatten()[:per_class]
                           for c in range(self.cfg.model.num_classes)])  # one row per class
        path = os.path.join(trainer.run_dir, "plots", f"samples_step_{trainer.step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_sample_grid(samples[order], path, nrow=per_class, labels=labels[order])
        log.log_image("samples", path, trainer.step)
        log.print(f"step {trainer.step}: {len(samples)} samples ({d.sampler}, {nfe} NFE, cfg {d.cfg_scale}): "
                  f"class accuracy {scores['acc']:.3f}, FD {scores['fd']:.3f} ({path})")
        return {"eval/acc": scores["acc"], "eval/fd": scores["fd"], "eval/nfe": nfe,
                **({"eval/fid": scores["fid"]} if "fid" in scores else {})}

    def final_line(self, step: int, val_loss: float, extra: dict) -> str:
        tail = ""
        if "eval/acc" in extra:
            tail = f"; samples: class accuracy {extra['eval/acc']:.3f}, FD {extra['eval/fd']:.3f}"
        return f"final: step {step}, val loss {val_loss:.4f}{tail}"

    @property
    def reference_loss(self) -> float | None:
        return None
