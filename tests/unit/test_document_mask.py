"""Document masking of packed windows (data.document_mask): models/doc_mask.py, the model's
forward with doc_ids, LMTask's ids from eos tokens, and short training runs with it on."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import models.attention
from models import build_model
from models.config import MoEConfig, ModelConfig
from models.doc_mask import document_positions_and_mask
from models.registry import preset_overrides
from trainer.lm.task import document_ids
from trainer.recipe import load_config

RECIPE = "recipes/llm/pretrain_tiny.yaml"
MLA = dict(attention="mla", mla_q_lora_rank=16, mla_kv_lora_rank=16, mla_qk_nope_head_dim=8,
           mla_qk_rope_head_dim=8, mla_v_head_dim=8)
DOC_LENGTHS = (5, 7, 9)  # odd, so no document starts where another's RoPE period lines up


def _tiny_model(attention: str):
    p = preset_overrides("tiny")
    model_kw = {**p["model"], "d_model": 64, "num_layers": 2, **(MLA if attention == "mla" else {})}
    moe_kw = {**p["moe"], "expert_ffn_dim": 64}
    torch.manual_seed(0)
    return build_model(ModelConfig(**model_kw), MoEConfig(**moe_kw)).eval()


def _ids(lengths, offset=0):
    return torch.cat([torch.full((n,), offset + i) for i, n in enumerate(lengths)])


def test_positions_restart_and_mask_is_block_diagonal_causal():
    cos_Sh, sin_Sh = torch.arange(6.0)[:, None], -torch.arange(6.0)[:, None]
    doc_ids_BS = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    cos_BSh, sin_BSh, mask_B1SS = document_positions_and_mask(doc_ids_BS, cos_Sh, sin_Sh)
    assert cos_BSh[..., 0].tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(sin_BSh, -cos_BSh)
    assert mask_B1SS.shape == (2, 1, 6, 6) and mask_B1SS.dtype == torch.bool
    blocks = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3), torch.ones(1, 1)).bool()
    assert torch.equal(mask_B1SS[0, 0], blocks & torch.ones(6, 6).tril().bool())
    assert torch.equal(mask_B1SS[1, 0], torch.ones(6, 6).tril().bool())


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_each_packed_document_gets_its_logits_alone(attention):
    model = _tiny_model(attention)
    torch.manual_seed(1)
    docs = [torch.randint(0, 260, (n,)) for n in DOC_LENGTHS]
    # Two rows, the documents in two orders: the mask and positions are per row.
    order = [(0, 1, 2), (2, 0, 1)]
    tokens_BS = torch.stack([torch.cat([docs[i] for i in row]) for row in order])
    doc_ids_BS = torch.stack([_ids([DOC_LENGTHS[i] for i in row], offset=3) for row in order])
    with torch.no_grad():
        packed_BSV = model(tokens_BS, doc_ids_BS)
        alone = [model(doc[None])[0] for doc in docs]
        unmasked_BSV = model(tokens_BS)
    for b, row in enumerate(order):
        start = 0
        for i in row:
            n = DOC_LENGTHS[i]
            torch.testing.assert_close(packed_BSV[b, start:start + n], alone[i], atol=1e-5, rtol=0)
            start += n
    # Without the mask, later documents see earlier ones: the test would notice a no-op mask.
    assert not torch.allclose(unmasked_BSV[0, 5:12], alone[1], atol=1e-3)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_without_doc_ids_the_plain_causal_path_runs(attention, monkeypatch):
    model = _tiny_model(attention)
    tokens_BS = torch.randint(0, 260, (2, 13))
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(models.attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain_BSV = model(tokens_BS)
        assert calls and all(c.get("is_causal") is True and c.get("attn_mask") is None for c in calls)
        calls.clear()
        one_doc_BSV = model(tokens_BS, torch.zeros_like(tokens_BS))
        assert calls and all(c.get("attn_mask") is not None and not c.get("is_causal") for c in calls)
    # One document over the whole window is plain causal attention at positions 0..S-1.
    torch.testing.assert_close(one_doc_BSV, plain_BSV, atol=1e-6, rtol=0)


def test_document_ids_from_eos():
    eos = 9
    inputs_BS = torch.tensor([[1, 2, eos, 3, eos, eos, 4],
                              [eos, 5, 6, 7, 8, 1, 2]])
    # An eos ends its document; a window may start inside a document or on an eos; two eos in a
    # row make an empty document of one token (the eos).
    assert document_ids(inputs_BS, eos).tolist() == [[0, 0, 0, 1, 1, 2, 3],
                                                     [0, 1, 1, 1, 1, 1, 1]]


SMALL = ["data.seq_len=32", "data.val_fraction=0.1", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "logging.wandb=false", "logging.progress_bar=false", "train.log_every=1",
         "eval.every=3", "eval.batches=1", "optim.warmup_steps=2", "train.micro_batch_size=4",
         "checkpoint.enabled=false", "logging.heatmap_every=0", "train.steps=3"]


def _short_documents(root) -> str:
    """A corpus of one-line documents (15-60 bytes): every 32-token window packs several."""
    os.makedirs(root, exist_ok=True)
    for i in range(200):
        with open(os.path.join(root, f"d{i:03d}.txt"), "w") as f:
            f.write(f"def f_{i}(x):\n    return x * {i}" + " + 1" * (i % 7))
    return f"data.source={root}"


def _run(run_dir, *overrides):
    """Train, then (train losses, final val loss) from rank 0's metrics.jsonl (other ranks: None)."""
    from trainer.loop import Trainer

    os.makedirs(run_dir, exist_ok=True)
    result = Trainer(load_config(RECIPE, SMALL + list(overrides)), run_dir).run()
    assert result.final_step == 3
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 3 and all(map(math.isfinite, losses + [result.final_val_loss]))
    return losses


def test_a_short_run_with_document_masks_trains(tmp_path):
    """Through the real loop, with block recompute (the mask passes the checkpoint hooks)."""
    torch.set_num_threads(1)
    source = _short_documents(str(tmp_path / "corpus"))
    masked = _run(str(tmp_path / "masked"), source, "data.document_mask=true", "parallel.activation_checkpoint=block")
    plain = _run(str(tmp_path / "plain"), source)
    # The same weights and batch at step 1: only the mask and positions can make the losses differ.
    assert masked[0] != plain[0]


def _ep_run(rank, world_size, out, source):
    return _run(out, source, "data.document_mask=true", "parallel.ep=2", "parallel.activation_checkpoint=block")


@pytest.mark.distributed
def test_a_short_run_with_document_masks_under_ep2(tmp_path):
    """ep=2 (dp=2): the all-to-all dispatch and its recompute tape with masked attention."""
    from tests.helpers.dist import run_distributed

    run_distributed(_ep_run, 2, str(tmp_path / "run"), _short_documents(str(tmp_path / "corpus")))
