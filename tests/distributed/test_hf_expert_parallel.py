"""An imported Hugging Face model keeps its function under expert parallelism: on 2 gloo ranks
with ep=2 (each rank holds half the experts and routes its own tokens through the all-to-all),
our model's logits match transformers' on each rank's batch within 1e-4 (fp32), for DeepSeek-V3
(MLA, sigmoid group-limited routing with the correction bias, shared experts, a dense first
layer), Qwen2-MoE (gated shared expert, q/k/v biases), GLM-4.5 (partial rotary, per-head q/k norm,
sigmoid group-limited routing with the correction bias, shared experts) and DeepSeek-V2 (MLA, softmax
routing limited to the groups of the best experts), Qwen3-MoE (per-head q/k norm, a sliding window,
a dense middle layer), dots1 (a sliding window on some layers, sigmoid routing) and gpt-oss (expert
biases, which shard with the experts; sinks, sliding window, YaRN). One spawn runs them all."""
import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

FAMILIES = ("deepseek_v3", "qwen2_moe", "glm4_moe", "deepseek_v2", "qwen3_moe", "dots1", "gpt_oss")


def _tokens(rank):
    return torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(10 + rank))


def _rank(rank, world_size, hf_dirs):
    import models
    from parallel import build_mesh, parallelize, unwrap
    from trainer.adapt.hf_bridge import hf_config, init_model_from

    out = {}
    for name, hf_dir in hf_dirs.items():
        cfg = hf_config(hf_dir)
        cfg.parallel.ep = 2
        model = models.build_model(cfg.model, cfg.moe)
        init_model_from(model, "hf:" + hf_dir)  # the whole model, then sharded
        mesh = build_mesh(cfg.parallel, torch.device("cpu"))
        model = parallelize(model, mesh, cfg.parallel).eval()
        experts = [m for n, m in unwrap(model).named_modules() if n.endswith("ffn.experts")]
        with torch.no_grad():
            out[name] = (model(_tokens(rank)), [t.shape[0] for e in experts for t in e.parameters()])
    return out


def test_imported_model_matches_transformers_under_ep2(tmp_path):
    pytest.importorskip("transformers")  # here, not at import: the spawned ranks need no transformers
    from tests.unit.test_hf_checkpoint import hf_model, save

    hf_dirs, expected = {}, {}
    for name in FAMILIES:
        hf = hf_model(name)
        hf_dirs[name] = save(hf, tmp_path / name, "per_expert")
        with torch.no_grad():
            expected[name] = [hf(_tokens(rank)).logits for rank in range(2)]
    results = run_distributed(_rank, 2, hf_dirs)
    for name in FAMILIES:
        num_experts = {"deepseek_v3": 8, "qwen2_moe": 6, "glm4_moe": 6, "deepseek_v2": 8, "qwen3_moe": 6,
                       "dots1": 6, "gpt_oss": 6}[name]
        for rank, result in enumerate(results):
            logits, local_experts = result[name]
            assert set(local_experts) == {num_experts // 2}  # each rank holds half the experts (biases too)
            diff = (logits - expected[name][rank]).abs().max().item()
            assert diff <= 1e-4, (name, rank, diff)


class _NoData:
    def state_dict(self) -> dict:
        return {}


def _save_ep2_and_one_rank(rank, world_size, out):
    """The same weights (one seed) saved by rank 0 alone as a weights checkpoint, then by both
    ranks through save_checkpoint after ep=2 sharded the experts (each rank writes its rows)."""
    import models
    from parallel import build_mesh, parallelize
    from trainer.adapt.hf_bridge import write_checkpoint
    from trainer.checkpoint import save_checkpoint
    from trainer.recipe import load_config

    cfg = load_config("recipes/llm/pretrain_tiny.yaml", ["model.d_model=64", "model.num_layers=2",
                                                         "moe.expert_ffn_dim=32", "parallel.ep=2"])
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.moe)
    if rank == 0:
        write_checkpoint(f"{out}/one_rank", cfg, model.state_dict(), {})
    model = parallelize(model, build_mesh(cfg.parallel, torch.device("cpu")), cfg.parallel)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(f"{out}/run", 0, model, optimizer, scheduler, _NoData(), cfg,
                    build_mesh(cfg.parallel, torch.device("cpu")))


def test_export_of_an_ep2_run_equals_the_one_rank_export(tmp_path):
    """export-hf reads a checkpoint written by 2 ranks with ep=2 (expert rows in each rank's file)
    one tensor at a time, in one process, and writes exactly the files the same weights saved by
    one process give, in both expert layouts."""
    pytest.importorskip("safetensors")
    import filecmp

    from torch.distributed.checkpoint import FileSystemReader

    from trainer.adapt.hf_export import export_hf

    run_distributed(_save_ep2_and_one_rank, 2, str(tmp_path))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000000"
    stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert len(stored["model.layers.0.ffn.experts.w1_EFD"].chunks) == 2  # each rank wrote its experts
    for layout in ("per_expert", "fused"):
        _, files = export_hf(str(tmp_path / "run"), str(tmp_path / f"ep2_{layout}"), expert_layout=layout,
                             max_shard_bytes=100_000)
        _, reference = export_hf(str(tmp_path / "one_rank"), str(tmp_path / f"one_{layout}"), expert_layout=layout,
                                 max_shard_bytes=100_000)
        assert files == reference and any(f.endswith(".index.json") for f in files)
        for name in files:
            ep2, one = tmp_path / f"ep2_{layout}" / name, tmp_path / f"one_{layout}" / name
            assert filecmp.cmp(ep2, one, shallow=False), name
