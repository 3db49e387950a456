"""ROME: rank-one model editing (REFERENCE_SPEC §1).

Per request and layer l: key direction ``u = C^-1 k* / ||C^-1 k*||`` (k* = template-averaged key,
§1.1), target value v* (§1.2, :mod:`massedit.editing.targets`), bare-prompt key/output ``k0, o0`` and

    r = (v* - o0) / (u . k0),      ΔW (out x in) = r u^T          (§1.3)

Requests are applied sequentially, each on the model that already carries the previous edits (§1.4).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from massedit.core.adapters import ArchAdapter, get_adapter
from massedit.core.deltas import Deltas
from massedit.core.guards import EditGuardError, check_finite
from massedit.editing.context_templates import flatten
from massedit.editing.hparams import EditHparams
from massedit.editing.keys import bare_prompt_io, rome_key
from massedit.editing.editor import RomeMemitEditor
from massedit.editing.targets import build_target_problem, optimise_targets

log = logging.getLogger(__name__)


def inverse_second_moment(C: torch.Tensor) -> torch.Tensor:
    """``C^-1`` as the reference forms it: ``torch.inverse`` in float32 (§1.1, §6.1)."""
    try:
        return torch.inverse(C.float())
    except torch.linalg.LinAlgError as e:
        raise EditGuardError(f"rome: the second moment C is singular ({e}); check the statistics") from None


def left_vector(k_star: torch.Tensor, C_inv: torch.Tensor | None) -> torch.Tensor:
    """``u = C^-1 k* / ||C^-1 k*||`` (or ``k*/||k*||`` without ``mom2_adjustment``)."""
    u = (C_inv @ k_star.unsqueeze(1)).squeeze(1) if C_inv is not None else k_star
    return u / u.norm()


def right_vector(v_star: torch.Tensor, o0: torch.Tensor, u: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
    """``r = (v* - o0) / (u . k0)``: after the update the bare prompt's key maps exactly to v*."""
    return (v_star - o0) / torch.dot(k0, u)


def rank_one_update(u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``ΔW = r u^T`` in the ``[d, m]`` (out x in) orientation."""
    return r.unsqueeze(1) @ u.unsqueeze(0)


def rome_request_update(model, tok, request, layer: int, hp: EditHparams, templates: Sequence[str],
                        C_inv: torch.Tensor | None, adapter: ArchAdapter | None = None, progress: bool = False):
    """One request at one layer on the current model: ``(ΔW [d, m] float32, intermediates dict)``."""
    adapter = adapter or get_adapter(model)
    k_star = rome_key(model, tok, adapter, layer, request, templates, hp.fact_token)
    # the algebra runs on hparams.solver_device (default: where the layer's key was read)
    device = torch.device(hp.solver_device) if getattr(hp, "solver_device", None) else k_star.device
    k_star = k_star.to(device)
    u = left_vector(k_star, C_inv.to(device) if (C_inv is not None and hp.mom2_adjustment) else None)
    problem = build_target_problem(tok, request, templates, hp.fact_token, hp.teacher_forcing, hp.kl_prompt)
    res = optimise_targets(model, tok, [problem], hp, edit_module=adapter.mlp_name(layer), edit_is_block=False,
                           nll_block=None, batched=False, progress=progress, desc=f"rome v* {request.case_id}",
                           prefix_block=layer - 1 if layer > 0 else None)[0]
    v_star = res.target.to(device)
    what = f"rome: request case_id={request.case_id}, layer {layer}"
    check_finite(u, f"{what}: key direction u = C⁻¹k*/‖C⁻¹k*‖", hint="C is singular or corrupt: check the statistics")
    check_finite(v_star, f"{what}: target value v*", hint="the target optimisation diverged: lower method.v_lr")
    k0, o0 = bare_prompt_io(model, tok, adapter.rewrite_name(layer), [request], hp.fact_token)
    k0, o0 = k0[0].to(device), o0[0].to(device)
    r = right_vector(v_star, o0, u, k0)
    upd = check_finite(rank_one_update(u, r), f"{what}: update ΔW = r uᵀ (u·k0 = {float(torch.dot(k0, u)):.3g})")
    inter = {
        "case_id": request.case_id, "layer": layer, "k_star": k_star.cpu(), "u": u.cpu(), "v0": res.init,
        "delta": res.delta, "v_star": v_star.cpu(), "k0": k0.cpu(), "o0": o0.cpu(),
        "u_dot_k0": float(torch.dot(k0, u)), "right_vector": r.cpu(), "n_adam_steps": res.n_adam_steps,
        "early_stopped": res.early_stopped, "loss_trace": res.loss_trace, "final_loss": res.final_loss,
        "input_ids": problem.input_ids, "lookup_idxs": problem.lookup_idxs, "target_ids": problem.target_ids,
    }
    return upd, inter


@torch.no_grad()
def _add_to_weight(adapter: ArchAdapter, layer: int, upd_out_in: torch.Tensor) -> None:
    w = adapter.rewrite_weight(layer)
    w.add_(adapter.to_param_layout(upd_out_in).to(device=w.device, dtype=w.dtype))


def apply_rome(model, tok, requests, hp: EditHparams, templates: Sequence[str], C_by_layer: dict[int, torch.Tensor] | None,
               progress: bool = True) -> tuple[Deltas, list[dict]]:
    """ROME over ``requests`` (sequential by default, §1.4); returns ``(deltas, per-request intermediates)``.

    The model is modified while editing and restored bit-identically before returning; the deltas are
    ``W_after - W_before`` per edited parameter (parameter layout). With ``hp.rome_sequential=False``
    every request's u, v* are computed on the unedited model and the rank-one updates are summed.
    """
    adapter = get_adapter(model)
    layers = sorted(hp.layers)
    names = {l: adapter.rewrite_weight_name(l) for l in layers}
    originals = {l: adapter.rewrite_weight(l).detach().clone() for l in layers}
    C_inv = {}
    if hp.mom2_adjustment:
        if C_by_layer is None:
            raise ValueError("ROME with mom2_adjustment needs second-moment statistics")
        C_inv = {l: check_finite(inverse_second_moment(C_by_layer[l]), f"rome: C⁻¹ of layer {l}",
                                 hint="C is singular or corrupt: check the statistics") for l in layers}
    inters: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []
    from massedit.core.progress import progress_bar

    bar = progress_bar(len(requests), "rome", unit="req", enabled=progress and len(requests) > 1)
    try:
        for req in requests:
            layer_updates = []
            for l in layers:  # several layers: ascending, each on the model carrying the previous layer's update
                upd, inter = rome_request_update(model, tok, req, l, hp, templates, C_inv.get(l), adapter)
                _add_to_weight(adapter, l, upd)
                layer_updates.append((l, upd))
                inters.append(inter)
            if not hp.rome_sequential:  # undo now; all updates are added at the end
                with torch.no_grad():
                    for l in layers:
                        adapter.rewrite_weight(l).copy_(originals[l])
                pending.extend(layer_updates)
            bar.update(1)
        if not hp.rome_sequential:
            for l, upd in pending:
                _add_to_weight(adapter, l, upd)
        deltas = {names[l]: (adapter.rewrite_weight(l).detach().float() - originals[l].float()).cpu() for l in layers}
    finally:
        bar.close()
        with torch.no_grad():
            for l in layers:
                adapter.rewrite_weight(l).copy_(originals[l])
    return deltas, inters


class RomeEditor(RomeMemitEditor):
    """``RomeEditor(hparams, stats).edit(model, tok, requests) -> deltas`` (model left as found)."""

    method = "rome"

    def edit(self, model, tok, requests) -> Deltas:
        t0 = time.time()
        hp = self.hparams.validate(get_adapter(model).num_layers)
        templates = flatten(self.get_context_templates(model, tok))
        C = self.get_stats(model, tok, hp.layers) if hp.mom2_adjustment else None
        deltas, inters = apply_rome(model, tok, list(requests), hp, templates, C, progress=self.progress)
        self.intermediates = {"requests": inters}
        steps = [i["n_adam_steps"] for i in inters]
        self.info.update({
            "method": "rome", "n_requests": len(requests), "layers": hp.layers, "n_templates": len(templates),
            "mean_adam_steps": sum(steps) / max(1, len(steps)), "early_stopped": sum(i["early_stopped"] for i in inters),
            "seconds": round(time.time() - t0, 2),
            "delta_norms": {k: float(v.norm()) for k, v in deltas.items()},
        })
        return deltas
