"""MEND (Mitchell et al. 2022): editor networks that turn gradient factors into weight edits.

See REFERENCE_SPEC §5 and docs/readme/mend.md.
"""
from .config import MendConfig, MendTrainConfig
from .editor import (MendEditor, accumulate_pseudo_gradients, build_mend_net, inner_params_from_cfg, load_editor,
                     mend_deltas, save_editor)
from .factors import (EditBatch, build_edit_batch, build_text_batch, capture_factors, edited_forward, inner_params,
                      kl_loc_loss, masked_nll, token_accuracy)
from .network import GradientTransform, IDMLP, InnerParam, MendNet, MendNetConfig, RunningNorm, pseudo_gradient

__all__ = [
    "MendConfig", "MendTrainConfig", "MendEditor", "accumulate_pseudo_gradients", "build_mend_net",
    "inner_params_from_cfg", "load_editor", "mend_deltas", "save_editor", "EditBatch", "build_edit_batch",
    "build_text_batch", "capture_factors", "edited_forward", "inner_params", "kl_loc_loss", "masked_nll",
    "token_accuracy", "GradientTransform", "IDMLP", "InnerParam", "MendNet", "MendNetConfig", "RunningNorm",
    "pseudo_gradient",
]
