"""The MEND training objective (REFERENCE_SPEC §5.4), plain torch: one evaluation of the edit and locality losses."""
from __future__ import annotations

import torch
from torch import nn

from .factors import EditBatch, capture_factors, edited_forward, group_mean_nll, kl_loc_loss, token_accuracy
from .network import MendNet


def mend_step(model: nn.Module, net: MendNet, batch: dict, cedit: float, cloc: float,
              with_pre: bool = True) -> dict[str, torch.Tensor]:
    """One MEND objective evaluation (REFERENCE_SPEC §5.4 steps 1–5); returns losses and metrics.

    ``loss = cedit·L_edit + cloc·L_loc`` is differentiable w.r.t. the editor (first order in the model).
    A batch may hold several independent edit problems (``row_group``, ``n_groups``): each gets its own
    factors (from its own token-mean loss) and its own ΔW; ``L_edit`` is the mean of the problems'
    token-mean NLLs and ``L_loc`` the token mean over all locality rows (one problem: the reference).
    ``with_pre`` adds the unedited model's edit metrics (one more forward; used in validation).
    """
    inner: EditBatch = batch["edit_inner"]
    outer: EditBatch = batch["edit_outer"]
    loc: EditBatch = batch["loc"]
    G = int(batch.get("n_groups", 1))
    grp = batch.get("row_group")
    if grp is None:
        grp = torch.zeros(inner.input_ids.shape[0], dtype=torch.long)
    grp = grp.to(inner.input_ids.device)
    with torch.no_grad():
        base_loc = model(**loc.model_inputs(), use_cache=False).logits
        pre_outer = model(**outer.model_inputs(), use_cache=False).logits if with_pre else None
    inner_loss, factors = capture_factors(
        model, net.inner,
        lambda: group_mean_nll(model(**inner.model_inputs(), use_cache=False).logits, inner.labels, grp, G).sum(),
        row_mask=inner.attention_mask, row_group=grp)
    updates = net.updates(factors, n_groups=G)
    with edited_forward(model, net.inner, updates, row_group=grp):
        post_outer = model(**outer.model_inputs(), use_cache=False).logits
        post_loc = model(**loc.model_inputs(), use_cache=False).logits
    l_edit = group_mean_nll(post_outer, outer.labels, grp, G).mean()
    l_loc = kl_loc_loss(base_loc, post_loc, loc.attention_mask)
    post_acc, post_exact = token_accuracy(post_outer, outer.labels)
    loc_pre_acc, _ = token_accuracy(base_loc, loc.labels)
    loc_post_acc, _ = token_accuracy(post_loc, loc.labels)
    out = {
        "loss": cedit * l_edit + cloc * l_loc,
        "edit_loss": l_edit,
        "loc_kl": l_loc,
        "inner_loss_pre": inner_loss / G,
        "edit_acc": post_acc,
        "edit_exact": post_exact.mean(),
        "loc_acc_pre": loc_pre_acc,
        "loc_acc_post": loc_post_acc,
        "drawdown": loc_pre_acc - loc_post_acc,
    }
    if pre_outer is not None:
        out["edit_loss_pre"] = group_mean_nll(pre_outer, outer.labels, grp, G).mean()
        out["edit_acc_pre"] = token_accuracy(pre_outer, outer.labels)[0]
    return out
