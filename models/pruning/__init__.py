"""Pruning and compression of MoE models (LLM and DiT alike: they share models/moe).

Expert pruning, from a calibration pass over the recipe's data:
    calibrate(model, run_forward, num_batches, criteria) -> Calibration
        per MoE layer: loads, gate mass, REAP sums, router-logit Gram, w2/w1 histogram (sums,
        `calib.all_reduce(fn)` adds them over data-parallel ranks), NAEE input rows (per rank)
    expert_scores(model, calib, criterion, reference_state=None, seed=0) -> [score [E_l]]
        frequency | gate_mass | router_norm | reap | random; the lowest are pruned
    choose_kept(scores, sparsity, budget, min_keep=1, multiple_of=1) -> [[kept ids]]
        budget per_layer | global; multiple_of = parallel.ep keeps every E_l shardable
    keep_counts(num_experts, sparsity, min_keep=1, multiple_of=1) -> [count]   per-layer budget
    naee_kept(model, calib, counts, exhaustive_limit=5000, all_reduce=None) -> [[kept ids]]
    prune_experts(model, kept)             in place: expert tensors, router rows, bias sliced
    merge_experts(model, calib, counts) -> [[[group ids]]]   in place, then sliced like pruning
    pruned_config(cfg, kept) -> cfg        moe.num_experts / layer_num_experts / top_k updated
    skip_betas(calib) -> [β per MoE layer] dynamic skipping (set cfg.moe.skip_beta)

Delta compression and magnitude pruning (models/pruning/delta.py):
    dare(delta, p, generator), darex(delta, p, q, generator)     one tensor
    dare_state(base_sd, ft_sd, p, q=None, seed=0) -> state dict  the whole model
    tune_darex_q(model, base_sd, ft_sd, p, hidden_fn, seed=0, num_q=21) -> (q, {q: error}); q log-spaced in [1 − p, 1]
    last_hidden(model, run_forward) -> hidden states before the head (for hidden_fn)
    ties_merge(base_sd, ft_sds, density, lam=1.0) -> state dict
    magnitude_prune(t, sparsity), nm_prune(t, n, m), parse_nm("2:4")
    magnitude_prune_experts(model, sparsity=0.0, nm=None) -> zero share of expert weights
"""
from models.pruning.calibrate import CRITERIA, Calibration, calibrate
from models.pruning.delta import (dare, dare_state, darex, dropped_deltas, last_hidden, magnitude_prune,
                                  magnitude_prune_experts, nm_prune, parse_nm, rescaled_state, ties_merge,
                                  tune_darex_q)
from models.pruning.experts import (choose_kept, expert_scores, keep_counts, merge_experts, naee_kept, prune_experts,
                                    pruned_config, pruned_moe_config, skip_betas)

__all__ = [
    "CRITERIA", "Calibration", "calibrate", "choose_kept", "dare", "dare_state", "darex", "dropped_deltas",
    "expert_scores", "keep_counts", "last_hidden", "magnitude_prune", "magnitude_prune_experts", "merge_experts",
    "naee_kept", "nm_prune", "parse_nm", "prune_experts", "pruned_config", "pruned_moe_config", "rescaled_state",
    "skip_betas", "ties_merge", "tune_darex_q",
]
