"""The target optimisation's loss head (:func:`head_log_probs`): log-softmax read at the NLL tokens and whole at the
KL rows, with a hand-formed gradient; equal to autograd's log_softmax + gather + slice in value and gradient."""
import torch

from massedit.editing.targets import head_log_probs


def test_head_log_probs_values_and_gradients_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 13, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (6,), generator=g)
    lp_t, lp_rest = head_log_probs(logits, 6, tokens)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(lp_t, ref[torch.arange(6), tokens]) and torch.equal(lp_rest, ref[6:])
    assert torch.autograd.gradcheck(lambda x: head_log_probs(x, 6, tokens), (logits,))
    # a loss of both outputs, as the optimisation's NLL + KL
    w = torch.randn(6, generator=g, dtype=torch.float64)
    q = torch.log_softmax(torch.randn(3, 13, generator=g, dtype=torch.float64), -1)
    def loss(a, b):
        return (w * a).sum() + (b.exp() * (b - q)).sum()
    grad, = torch.autograd.grad(loss(lp_t, lp_rest), logits)
    grad_ref, = torch.autograd.grad(loss(ref[torch.arange(6), tokens], ref[6:]), logits)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)
    # only one of the outputs used
    grad_t, = torch.autograd.grad(head_log_probs(logits, 6, tokens)[0].sum(), logits)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(grad_t, torch.autograd.grad(ref[torch.arange(6), tokens].sum(), logits)[0], atol=1e-12)
