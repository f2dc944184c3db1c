"""Quantize-and-append: tokens leaving the float tail become kvspec.layout arrays in one pass.

`quantize_rows(x, t, float_dtype, basis, out)` takes the M tokens x [B, H, M, D] that move from the
float tail into the compressed part (the residual-window flush: the oldest rows of tail + chunk, as
kvtorch.store chooses them) and writes their stored arrays, in kvspec.layout form, into `out` (for
example views of rows [n, n + M) of preallocated storage) or into fresh tensors:
- Quant, token axis:   codes int32 [B, H, M, W(D)], scales/biases fp16 [B, H, M, D/G]
- Quant, channel axis: codes int32 [B, H, M, W(D)], scales/biases fp16 [B, H, M/G, D]  (M % G == 0,
  rows starting at a group boundary)
- LowRank:             coeffs [B, H, M, r] in the float dtype
- LowRank hybrid:      codes int32 [B, H, M, W(r)], scales/biases fp16 [B, H, M, r/G]
Each token is first rounded to the float dtype, then rotated (fp32 butterfly) or projected on the
basis [H, D, r] (fp32), then quantized with kvspec's numerics, so codes, scales and biases are
bit-identical to kvspec.reference (projected coefficients may differ by one fp16 ulp: the
reference projects in float64). Inputs must be finite and within the fp16 range: callers check
(kvtorch.ops.check_finite) before, as kvtorch.store does.

`quantize_rows_reference` is the same in plain torch ops; the dispatcher runs the Triton kernel
where `refusal` is None (CUDA, or CPU under TRITON_INTERPRET=1; shapes in kernels.support).
`quantize_pair` takes K and V of a layer under one spec in one launch (kvtorch.store's appends).
"""

from __future__ import annotations

import torch

from kvspec.layout import compressed_shapes
from kvspec.reference.rotation import norm_factor
from kvspec.spec import LowRank, Quant, TensorSpec

from .. import ops
from .support import on_device, rotation_signs, tensor_refusal, triton_refusal


def stored_arrays(x: torch.Tensor, t: TensorSpec, float_dtype: str) -> dict[str, torch.Tensor]:
    """Empty kvspec.layout arrays for the M rows of x [B, H, M, D] (codes int32, scales fp16, ...)."""
    b, h, m, d = x.shape
    dtypes = {"codes": torch.int32, "coeffs": ops.float_dtype(float_dtype)}
    return {
        name: torch.empty(shape, dtype=dtypes.get(name, torch.float16), device=x.device)
        for name, shape in compressed_shapes(t, b, h, m, d).items()
    }


def quantize_rows_reference(
    x: torch.Tensor, t: TensorSpec, float_dtype: str, basis: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Plain-torch `quantize_rows`: x [B, H, M, D] -> kvspec.layout arrays of those M rows."""
    xr = ops.round_to(x, float_dtype)
    if isinstance(t, Quant):
        head = xr.float() if t.rotation is None else ops.rotate(xr, t.rotation)
        return dict(zip(("codes", "scales", "biases"), ops.quantize(head, t.bits, t.group, t.axis)))
    if not isinstance(t, LowRank) or basis is None:
        raise ValueError("quantize_rows needs a Quant tensor, or a LowRank tensor with its basis [H, D, r]")
    c = torch.einsum("bhtd,hdr->bhtr", xr.double(), basis.double()).float()
    if t.coeff is None:
        return {"coeffs": ops.round_to(c, float_dtype)}
    return dict(zip(("codes", "scales", "biases"), ops.quantize(c, t.coeff.bits, t.coeff.group, "token")))


def refusal(x: torch.Tensor, t: TensorSpec, basis: torch.Tensor | None = None) -> str | None:
    """Why the kernel cannot quantize x [B, H, M, D] for spec t (None: it can)."""
    why = triton_refusal(x.device) or tensor_refusal(t, x.shape[-1])
    if why:
        return why
    if isinstance(t, Quant) and t.axis == "channel" and x.shape[-2] % t.group:
        return f"channel axis needs whole groups: {x.shape[-2]} rows, group {t.group}"
    if isinstance(t, LowRank) and (basis is None or basis.device != x.device):
        return "a low-rank tensor needs its basis on the same device"
    return None


def quantize_rows(
    x: torch.Tensor,
    t: TensorSpec,
    float_dtype: str,
    basis: torch.Tensor | None = None,
    out: dict[str, torch.Tensor] | None = None,
    row0: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Compress the M rows x [B, H, M, D] (see module docstring); writes into `out` if given and
    returns the arrays. The kernel where it can run, else `quantize_rows_reference`.
    row0: int64 [1] on x's device: write rows [row0, row0 + M) of `out` (whole storage of a static
    cache), a position the host need not know (CUDA graphs), or nothing where row0 < 0; kernel only
    (channel axis: row0 at a group boundary)."""
    if out is None:
        out = stored_arrays(x, t, float_dtype)
    if row0 is not None:
        why = refusal(x, t, basis)
        if why:
            raise ValueError(f"a device-held row needs the quantize kernel: {why}")
    elif refusal(x, t, basis) is not None:
        for name, arr in quantize_rows_reference(x, t, float_dtype, basis).items():
            out[name].copy_(arr)
        return out
    _launch(x, t, float_dtype, basis, out, row0)
    return out


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride along D (the kernel indexes that axis directly)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_pair(xs: tuple[torch.Tensor, torch.Tensor], t: TensorSpec, float_dtype: str,
                  bases: tuple[torch.Tensor | None, torch.Tensor | None], outs: tuple[dict, dict],
                  row0: torch.Tensor | None = None) -> None:
    """`quantize_rows` of K and V of one layer (xs, with their bases and `out` arrays) under one spec
    t: one kernel launch where the kernel takes both and their layouts agree, else one call each.
    row0 (as quantize_rows') applies to both."""
    from ._quantize_triton import same_layout

    (xk, xv), (bk, bv), (ok, ov) = (_unit_stride(x) for x in xs), bases, outs
    if refusal(xk, t, bk) is None and refusal(xv, t, bv) is None and same_layout(xk, xv, t, ok, ov):
        _launch(xk, t, float_dtype, bk, ok, row0, (xv, bv, ov))
        return
    quantize_rows(xk, t, float_dtype, bk, out=ok, row0=row0)
    quantize_rows(xv, t, float_dtype, bv, out=ov, row0=row0)


def _launch(x: torch.Tensor, t: TensorSpec, float_dtype: str, basis: torch.Tensor | None, out: dict,
            row0: torch.Tensor | None, second: tuple | None = None) -> None:
    """The kernel over x into out (and over second = (x2, basis2, out2) in the same launch)."""
    from ._quantize_triton import quantize_rows_triton

    x = _unit_stride(x)

    signs, rot_norm = None, 1.0
    if isinstance(t, Quant) and t.rotation is not None:
        d = x.shape[-1]
        signs = rotation_signs(d, t.rotation, x.device)
        rot_norm = float(norm_factor(d))
    as32 = lambda p: p.float().contiguous() if isinstance(t, LowRank) else None  # noqa: E731
    if second is not None:
        x2, basis2, out2 = second
        second = (x2, out2, as32(basis2))
    with on_device(x):
        quantize_rows_triton(x, t, ops.float_dtype(float_dtype), out, signs, rot_norm, as32(basis), row0, second)

