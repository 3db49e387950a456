"""ROME / MEMIT Lightning callbacks: the model is edited at the chosen hook of a validation run, the deltas
file is written, and revert_at_end restores the weights bit-identically."""
import pytorch_lightning as pl
import torch

from massedit.callbacks.memit import MEMIT
from massedit.callbacks.rome import ROME
from massedit.core.adapters import get_adapter
from massedit.core.deltas import load_deltas
from massedit.core.tokenization import target_token_ids
from massedit.data.requests import EditRequest
from massedit.editing.hparams import EditHparams
from massedit.testing import corpus_second_moments
from massedit.testing import _CORPUS, memit_normal_equation_error, rome_direction_error, tiny_model

TEXTS = [s.strip() + "." for s in _CORPUS.split(".") if s.strip()]
REQ = EditRequest(case_id=1, subject="Japan", prompt="The capital of {}", target_new="Rome", target_true="Tokyo")


class Wrapper(pl.LightningModule):
    def __init__(self, model, tok):
        super().__init__()
        self.model, self.tok = model, tok
        self.seen = []

    def validation_step(self, batch, idx):
        ids = self.tok(REQ.filled_prompt, return_tensors="pt")
        self.seen.append(int(self.model(**ids).logits[0, -1].argmax()))


def _run(cb_cls, hp, tmp_path, revert):
    torch.set_num_threads(1)
    model, tok = tiny_model("gpt2", seed=0)
    C = corpus_second_moments(model, tok, hp.layers, TEXTS)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    module = Wrapper(model, tok)
    cb = cb_cls([REQ], hparams=hp, stats=lambda m, t, l: C, context_templates=["{}", "The city. {}"],
                save_path=tmp_path / "deltas.safetensors", revert_at_end=revert, progress=False, hook="on_validation_start",
                max_relative_norm=None)  # clamp_norm_factor=1000 on a random tiny model: updates 100s x ‖W‖
    trainer = pl.Trainer(callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader([0], batch_size=1), verbose=False)
    target = target_token_ids(tok, " Rome")[0]
    assert module.seen == [target]  # edited before the first validation batch
    saved = load_deltas(tmp_path / "deltas.safetensors")
    assert set(saved) == set(cb.deltas)
    same = all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert same == revert
    return cb, C, get_adapter(model)


def test_rome_callback(tmp_path):
    hp = EditHparams(layers=[1], v_num_grad_steps=20, clamp_norm_factor=1000.0, v_weight_decay=0.0)
    cb, C, a = _run(ROME, hp, tmp_path, revert=True)
    # the saved update is r uᵀ with u ∝ C⁻¹k* for the (anisotropic) corpus C: fails for u = k*
    k_star = cb.editor.intermediates["requests"][0]["k_star"]
    assert rome_direction_error(a.from_param_layout(cb.deltas[a.rewrite_weight_name(1)]), k_star, C[1]) < 1e-3


def test_memit_callback(tmp_path):
    hp = EditHparams(layers=[1, 2], v_num_grad_steps=20, clamp_norm_factor=1000.0, v_weight_decay=0.0,
                     mom2_update_weight=0.1)
    cb, C, a = _run(MEMIT, hp, tmp_path, revert=False)
    # each layer's update solves ΔW (λC + KKᵀ) = E/(|R|-i) Kᵀ: fails if the solve drops or replaces λC
    for p in cb.editor.intermediates["batches"][0]["per_layer"]:
        err = memit_normal_equation_error(a.from_param_layout(cb.deltas[p["weight_name"]]), p["K"], p["E"], C[p["layer"]],
                                          hp.mom2_update_weight, p["i"], len(hp.layers))
        assert err < 1e-3, (p["layer"], err)
