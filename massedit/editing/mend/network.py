"""MEND editor networks (REFERENCE_SPEC §5.3): running factor normalisation, identity-initialised
low-rank residual MLPs with per-layer scale/shift, one network per weight shape, learned edit LRs.

Everything here is plain torch; nothing knows about Lightning or about the language model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn


# ----------------------------------------------------------------------------------- normalisation
class RunningNorm(nn.Module):
    """Running per-feature mean / std of factor rows (REFERENCE_SPEC §5.3, ``norm: true``).

    The reference updates a Welford accumulator row by row; :meth:`update` merges a whole block of
    rows at once with Chan's parallel formula, which gives the same mean and ``M2`` (the first row
    initialises the mean, ``std = sqrt(M2 / (k - 1))``). Unlike the reference (NaN until two rows
    were seen) the std is 1 while fewer than two rows were seen, and the "initialised" state is the
    saved ``count`` buffer, so it survives a checkpoint round-trip.
    """

    def __init__(self, dim: int, eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Merge ``rows [n, dim]`` into the running statistics."""
        if rows.numel() == 0:
            return
        rows = rows.detach().to(self.mean.dtype)
        n_b = float(rows.shape[0])
        mean_b = rows.mean(0)
        m2_b = ((rows - mean_b) ** 2).sum(0)
        n_a = float(self.count)
        if n_a == 0:
            self.mean.copy_(mean_b)
            self.m2.copy_(m2_b)
        else:
            n = n_a + n_b
            delta = mean_b - self.mean
            self.mean.add_(delta * (n_b / n))
            self.m2.add_(m2_b + delta ** 2 * (n_a * n_b / n))
        self.count.add_(n_b)

    @property
    def std(self) -> torch.Tensor:
        k = float(self.count)
        if k < 2:
            return torch.ones_like(self.m2)
        return (self.m2 / (k - 1)).clamp_min(0).sqrt()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows - mean) / (std + eps)``; identity until any row was seen."""
        if float(self.count) == 0:
            return rows
        return (rows - self.mean) / (self.std + self.eps)


# ----------------------------------------------------------------------------------- IDMLP
class LowRankResidual(nn.Module):
    """One IDMLP layer: ``h + clamp_min0((U (V h) + b) * scale[mode] + shift[mode])`` (REFERENCE_SPEC §5.3).

    ``U`` starts at zero and ``V ~ N(0, 1)``, so the layer is the identity at initialisation.
    ``clamp`` False drops the ReLU (the reference clamps in every layer: [QUIRK], ``relu_last``).
    """

    def __init__(self, dim: int, rank: int, n_modes: int, clamp: bool = True):
        super().__init__()
        r = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.v = nn.Parameter(torch.randn(r, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Embedding(n_modes, dim)
        self.mode_shift = nn.Embedding(n_modes, dim)
        nn.init.ones_(self.mode_scale.weight)
        nn.init.zeros_(self.mode_shift.weight)
        self.clamp = clamp

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        m = torch.as_tensor(mode, device=h.device)
        pre = (h @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.mode_scale(m) + self.mode_shift(m)
        return h + (pre.clamp(min=0) if self.clamp else pre)


class IDMLP(nn.Module):
    """``n_hidden + 1`` identity-initialised low-rank residual layers of width ``dim``."""

    def __init__(self, dim: int, rank: int, n_modes: int, n_hidden: int = 1, relu_last: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, n_modes, clamp=(k < n_hidden) or relu_last) for k in range(n_hidden + 1)
        )

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class GradientTransform(nn.Module):
    """Maps the factors ``(x [n, in], δ [n, out])`` of one weight's gradient to ``(x̂, δ̂)`` (§5.3).

    ``combine``: one network over ``[x̃ ; δ̃]`` (reference default); otherwise one per side.
    Normalisation statistics are updated from the rows whenever the module is in training mode.
    """

    def __init__(self, in_dim: int, out_dim: int, n_modes: int, *, rank: int = 1920, n_hidden: int = 1,
                 norm: bool = True, combine: bool = True, relu_last: bool = True):
        super().__init__()
        self.in_dim, self.out_dim, self.combine, self.use_norm = in_dim, out_dim, combine, norm
        self.x_norm = RunningNorm(in_dim)
        self.d_norm = RunningNorm(out_dim)
        if combine:
            self.mlp = IDMLP(in_dim + out_dim, rank, n_modes, n_hidden, relu_last)
        else:
            self.mlp_x = IDMLP(in_dim, rank, n_modes, n_hidden, relu_last)
            self.mlp_d = IDMLP(out_dim, rank, n_modes, n_hidden, relu_last)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 factors (reference); the network's own dtype if it was cast (e.g. Trainer precision bf16-true)
        dt = self.x_norm.mean.dtype
        x, delta = x.to(dt), delta.to(dt)
        if self.use_norm:
            if self.training:
                self.x_norm.update(x)
                self.d_norm.update(delta)
            x, delta = self.x_norm(x), self.d_norm(delta)
        if self.combine:
            out = self.mlp(torch.cat([x, delta], -1), mode)
            return out[:, : self.in_dim], out[:, self.in_dim:]
        return self.mlp_x(x, mode), self.mlp_d(delta, mode)


# ----------------------------------------------------------------------------------- the editor
@dataclass
class InnerParam:
    """One edited weight: its parameter name, module name, and ``in``/``out`` dimensions."""

    param: str
    module: str
    in_dim: int
    out_dim: int
    conv1d: bool = False                  # weight stored [in, out] (GPT-2 Conv1D)

    @property
    def shape_key(self) -> str:
        return f"{self.in_dim}x{self.out_dim}"

    @property
    def param_shape(self) -> tuple[int, int]:
        return (self.in_dim, self.out_dim) if self.conv1d else (self.out_dim, self.in_dim)


@dataclass
class MendNetConfig:
    """Architecture switches of the editor (REFERENCE_SPEC §5.3; defaults = reference)."""

    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    combine: bool = True
    shared: bool = True
    relu_last: bool = True                # [QUIRK] reference clamps the last IDMLP layer too
    edit_lr: float = 1e-4                 # initial learned LR per inner param
    update_sign: float = -1.0             # -1: W - α·G̃ (descent, init = a gradient step); reference +1

    @classmethod
    def from_cfg(cls, cfg) -> "MendNetConfig":
        """The network fields of a ``method=mend`` config (:class:`~massedit.editing.mend.config.MendConfig`)."""
        return cls(**{k: type(v)(getattr(cfg, k)) for k, v in asdict(cls()).items()})


def pseudo_gradient(x_hat: torch.Tensor, delta_hat: torch.Tensor) -> torch.Tensor:
    """``G̃ = Σ_rows δ̂ x̂ᵀ`` in the ``[out, in]`` layout (REFERENCE_SPEC §5.3): a sum over rows."""
    return delta_hat.T @ x_hat


class MendNet(nn.Module):
    """All editor networks of one model plus the learned per-parameter edit LRs.

    One :class:`GradientTransform` per distinct ``(in, out)`` shape (``shared``) with one mode per inner
    parameter of that shape, or one per parameter (``shared: false``).
    """

    def __init__(self, inner: Sequence[InnerParam], config: MendNetConfig | None = None):
        super().__init__()
        self.config = config or MendNetConfig()
        self.inner = list(inner)
        if not self.inner:
            raise ValueError("MEND needs at least one inner parameter to edit")
        names = [p.param for p in self.inner]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate inner parameters: {names}")
        self.keys: list[str] = []
        self.modes: list[int] = []
        counts: dict[str, int] = {}
        for k, p in enumerate(self.inner):
            key = p.shape_key if self.config.shared else f"p{k}"
            self.keys.append(key)
            self.modes.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        c = self.config
        self.transforms = nn.ModuleDict()
        for key, n in counts.items():
            p = self.inner[self.keys.index(key)]
            self.transforms[key] = GradientTransform(p.in_dim, p.out_dim, n, rank=c.rank, n_hidden=c.n_hidden,
                                                     norm=c.norm, combine=c.combine, relu_last=c.relu_last)
        self.edit_lrs = nn.Parameter(torch.full((len(self.inner),), float(c.edit_lr)))

    def index(self, param: str) -> int:
        for k, p in enumerate(self.inner):
            if p.param == param:
                return k
        raise KeyError(param)

    def transform(self, k: int, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed factors of inner parameter ``k``."""
        return self.transforms[self.keys[k]](x, delta, self.modes[k])

    def transformed_gradient(self, k: int, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Σ x̂ δ̂ᵀ`` for inner parameter ``k`` (``[out, in]``), before the learned LR."""
        xh, dh = self.transform(k, x, delta)
        return pseudo_gradient(xh, dh)

    def scale_update(self, k: int, g: torch.Tensor) -> torch.Tensor:
        """``ΔW = sign · α_k · G̃`` (``[out, in]``); REFERENCE_SPEC §5.3 update with the learned LR."""
        return self.config.update_sign * self.edit_lrs[k] * g

    def updates(self, factors: dict[str, tuple], n_groups: int | None = None) -> dict[str, torch.Tensor]:
        """``{param -> ΔW [out, in]}`` from ``{param -> (x rows, δ rows)}`` (differentiable). With
        ``n_groups`` the values are ``(x, δ, group ids)`` and each ΔW is ``[n_groups, out, in]``: one
        update per independent edit problem, ``Σ_{rows of g} x̂ δ̂ᵀ``."""
        out = {}
        for k, p in enumerate(self.inner):
            if p.param not in factors:
                continue
            f = factors[p.param]
            if n_groups is None:
                out[p.param] = self.scale_update(k, self.transformed_gradient(k, f[0], f[1]))
            else:
                xh, dh = self.transform(k, f[0], f[1])
                onehot = torch.nn.functional.one_hot(f[2], n_groups).to(xh.dtype)
                g = torch.einsum("rg,ro,ri->goi", onehot, dh, xh)
                out[p.param] = self.scale_update(k, g)
        return out

    def describe(self) -> dict:
        return {"config": asdict(self.config), "inner": [asdict(p) for p in self.inner]}

    @classmethod
    def from_description(cls, desc: dict) -> "MendNet":
        return cls([InnerParam(**p) for p in desc["inner"]], MendNetConfig(**desc["config"]))


def to_param_layout(p: InnerParam, delta_out_in: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` update in the weight's stored layout (transposed for Conv1D)."""
    return delta_out_in.T if p.conv1d else delta_out_in
