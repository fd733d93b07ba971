"""Document masking of packed windows (data.document_mask, docs/data.md).

A training window packs several documents back to back. With per-token document ids, attention
stays inside each document (a block-diagonal causal mask) and RoPE positions restart at 0 for
each document, so a document sees exactly what it would see alone at the start of a window.

Shape legend: B sequences   S tokens per sequence   h RoPE channels // 2
"""
from __future__ import annotations

import torch


def document_positions_and_mask(doc_ids_BS: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token RoPE tables and the attention mask of packed documents.

    A document is a run of equal ids (the ids are non-decreasing along S). Query i sees key j iff
    j <= i and j is in i's document; expressed through the document's first index rather than an
    id comparison, so a repeated id further on never joins two runs and the mask always agrees
    with the positions. Every query sees at least itself, so no row is empty (SDPA gives NaN there).

    Args:
        doc_ids_BS: int document id of every token, non-decreasing along S.
        cos_Sh, sin_Sh: the RoPE tables of positions 0..S-1 (`RotaryTables.first(S)`).

    Returns:
        (cos_BSh, sin_BSh, mask_B1SS): the tables gathered at each token's position in its
        document, and a boolean mask (True: attend) for `F.scaled_dot_product_attention`,
        broadcast over heads.
    """
    S = doc_ids_BS.shape[1]
    index_S = torch.arange(S, device=doc_ids_BS.device)
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    # Index of each token's document start: the latest start at or before it.
    first_BS = torch.where(starts_BS, index_S, 0).cummax(dim=1).values
    positions_BS = index_S - first_BS
    causal_SS = index_S[None, :] <= index_S[:, None]
    mask_BSS = causal_SS & (index_S[None, None, :] >= first_BS[:, :, None])
    return cos_Sh[positions_BS], sin_Sh[positions_BS], mask_BSS[:, None]
