"""The trainable stand-in for one quantized linear during float-part tuning: float32 master
copies of the group scales and zeros (absolute or relative to the solved ones) over frozen
codes, or latent weights rounded straight-through onto the grid (GQSA's BQPO). The block-level
driver is :mod:`bitpress.pipeline.blocktune`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats import QuantizedWeight, integer_zero_params, qrange


def _grouped(t: torch.Tensor, gs: int, ng: int) -> torch.Tensor:
    """``[out, in]`` → ``[out, ng, gs]`` zero-padded (the padding is sliced off again)."""
    out, n = t.shape
    pad = ng * gs - n
    if pad:
        t = nn.functional.pad(t, (0, pad))
    return t.reshape(out, ng, gs)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class TunedLinear(nn.Module):
    """Computes ``x Wᵀ + b`` with ``W`` built from codes (or latent weights) and float32
    master copies of the group parameters; stands in for one linear during tuning."""

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor], mode: str,
                 train_zero: bool, latent: str = "code", relative: bool = False,
                 zp: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        # integer zero points: the offsets stay tied to the scales, z = -zp·s (zp frozen)
        self.register_buffer("zp", None if zp is None else zp.float())
        train_zero = train_zero and zp is None
        self.mode, self.bits, self.latent_kind = mode, qw.bits, latent
        self.gs, self.ng, self.n = qw.gs, qw.n_groups, qw.in_features
        self.qmin, self.qmax = qrange(qw.bits)
        self.relative = relative
        s0 = qw.scale.detach().float().clone()
        z = qw.zero.detach().float().clone()
        if relative:  # s = s0·(1 + δ), z = z0 + s0·ε: the trained δ, ε are in units of s0
            self.register_buffer("s0", s0)
            self.register_buffer("z0", z)
            self.d_scale = nn.Parameter(torch.zeros_like(s0))
            self.d_zero = nn.Parameter(torch.zeros_like(z)) if train_zero else None
        else:
            self.scale = nn.Parameter(s0)
            self.zero = nn.Parameter(z) if train_zero else None
            if not train_zero:
                self.register_buffer("zero_fixed", z)
        keep = qw.keep if qw.keep is not None else None
        self.register_buffer("keep", None if keep is None else keep.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if mode == "float_parts":
            self.register_buffer("codes", _grouped(qw.codes.float(), self.gs, self.ng))
            self.latent = None
        elif latent == "code":  # V = s·U + z with U in code units, initialised at the codes
            self.codes = None
            self.latent = nn.Parameter(_grouped(qw.codes.float(), self.gs, self.ng))
        else:  # latent weights V themselves
            self.codes = None
            self.latent = nn.Parameter(_grouped(qw.dequantize(), self.gs, self.ng).clone())

    def s(self) -> torch.Tensor:
        return self.s0 * (1 + self.d_scale) if self.relative else self.scale

    def z(self) -> torch.Tensor:
        if self.zp is not None:
            return -self.zp * self.s()
        if self.relative:
            return self.z0 + self.s0 * self.d_zero if self.d_zero is not None else self.z0
        return self.zero if self.zero is not None else self.zero_fixed

    def trainable_params(self) -> list[nn.Parameter]:
        """The scale/zero parameters the optimiser moves (absolute or relative to ``s0``)."""
        ps = (self.d_scale, self.d_zero) if self.relative else (self.scale, self.zero)
        return [p for p in ps if p is not None]

    def weight(self) -> torch.Tensor:
        s, z = self.s(), self.z()
        if self.keep is not None:
            s, z = s * self.keep, z * self.keep
        if self.mode == "float_parts":
            q = self.codes
        elif self.latent_kind == "code":
            q = torch.clamp(_round_ste(self.latent), self.qmin, self.qmax)
        else:
            sd = self.s().detach()
            sd = torch.where(sd.abs() > 1e-12, sd, torch.full_like(sd, 1e-12))
            u = (self.latent - self.z().detach()[..., None]) / sd[..., None]
            q = torch.clamp(_round_ste(u), self.qmin, self.qmax)
        w = q * s[..., None] + z[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep latent codes within half a step of the grid so the rounding stays live."""
        if self.latent is not None and self.latent_kind == "code":
            self.latent.clamp_(self.qmin - 0.49, self.qmax + 0.49)

    @torch.no_grad()
    def result(self, old: QuantizedWeight, param_dtype: Optional[torch.dtype]
               ) -> QuantizedWeight:
        """The tuned QuantizedWeight: parameters rounded to the storage dtype; pruned groups
        keep their old codes and parameters; ``bqpo`` re-derives (clamped) codes."""
        def rnd(t: torch.Tensor) -> torch.Tensor:
            return t.to(param_dtype).float() if param_dtype is not None else t.float()

        kept = old.keep if old.keep is not None else torch.ones_like(old.scale, dtype=torch.bool)
        if self.zp is not None:  # s and zp·s exact in the storage dtype
            s_int, z_int = integer_zero_params(self.s(), self.z(), self.bits, param_dtype,
                                               zp=self.zp)
            scale = torch.where(kept, s_int, old.scale.float())
            zero = torch.where(kept, z_int, old.zero.float())
        else:
            scale = torch.where(kept, rnd(self.s()), old.scale.float())
            zero = torch.where(kept, rnd(self.z()), old.zero.float())
        codes = old.codes
        if self.mode == "bqpo":
            ok = kept & (scale.abs() > 1e-12)
            safe = torch.where(ok, scale, torch.ones_like(scale))
            u = self.latent if self.latent_kind == "code" else \
                (self.latent - zero[..., None]) / safe[..., None]
            q = torch.clamp(torch.round(u), self.qmin, self.qmax)
            q = q.reshape(q.shape[0], -1)[:, : self.n].to(torch.int8)
            okx = ok.repeat_interleave(self.gs, dim=1)[:, : self.n]
            codes = torch.where(okx, q, old.codes)
        return QuantizedWeight(codes.contiguous(), scale, zero, old.bits, old.group_size,
                               old.keep)
