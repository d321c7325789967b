"""Initialising an anchored kernel from the pretrained kernels of its group.

``fit`` solves  min  sum_l || W_l - diag(a_l) W_G[:co_l, :ci_l] ||^2  over the anchor W_G
and one scale per output channel and member (a_l). The per-channel scales are free
in the converted net because they fold exactly into the following BatchNorm (the
paper keeps every BN free, section 3, eq. 4): the layer then computes diag(a_l)(W_G * x).

For members of one shape this is, per output channel, the best rank-1 approximation
of the (members x kernel) matrix — the fixed point of alternating least squares —
so we take it in closed form from the top eigenvector of its Gram matrix. Members
of different shapes (``plain`` mode slices) are fitted by alternating least squares.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..defaults import BASIS_CACHE_BYTES
from ..registry import Registry
from ..validate import inputs_of
from .modes import mode

FITS: Registry[Callable[[list[torch.Tensor], tuple[int, ...]], Fit]] = Registry("init")


@dataclass
class Fit:
    """An anchor, the per-member output-channel scales (None means all ones), and fit errors."""

    anchor: torch.Tensor
    scales: list[torch.Tensor | None]
    errors: list[float]  # ||W_l - a_l W_G|| / ||W_l|| per member


register_fit = FITS.register  # decorator: a weight-space initialisation under a name


def _slice(anchor: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return anchor[: w.shape[0], : w.shape[1]]


def _errors(weights: list[torch.Tensor], anchor: torch.Tensor, scales: list[torch.Tensor | None]) -> list[float]:
    out = []
    for w, a in zip(weights, scales, strict=True):
        approx = _slice(anchor, w) * (a.view(-1, 1, 1, 1) if a is not None else 1.0)
        norm = w.norm().item()
        out.append((w - approx).norm().item() / norm if norm > 0 else 0.0)
    return out


def _masked_mean(weights: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    total = torch.zeros(shape)
    count = torch.zeros(shape)
    for w in weights:
        total[: w.shape[0], : w.shape[1]] += w
        count[: w.shape[0], : w.shape[1]] += 1
    return total / count.clamp_min(1)


@register_fit("mean")
def fit_mean(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """Element-wise mean of the members (over the members that cover each element)."""
    anchor = _masked_mean(weights, shape)
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("first")
def fit_first(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """The first member's kernel; elements it does not cover take the members' mean."""
    anchor = _masked_mean(weights, shape)
    anchor[: weights[0].shape[0], : weights[0].shape[1]] = weights[0]
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("random")
def fit_random(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """nn.Conv2d's default initialisation for the anchor's shape; pretrained weights are ignored."""
    anchor = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(anchor, a=math.sqrt(5))
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("fit")
def fit_scaled(weights: list[torch.Tensor], shape: tuple[int, ...], iters: int = 50, tol: float = 1e-6) -> Fit:
    """Least-squares anchor with per-output-channel scales (see module docstring)."""
    if all(tuple(w.shape) == tuple(shape) for w in weights):
        anchor, scales = _rank1(weights)
    else:
        anchor, scales = _als(weights, shape, iters, tol)
    return Fit(anchor, list(scales), _errors(weights, anchor, list(scales)))


def _normalise_scales(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split scale between anchor and members: RMS of each channel's scales 1, mean positive.

    ``a`` is (channels, members). Returns (a / s, s): the anchor row absorbs s. A mean-1
    normalisation would explode when members have opposite signs, and huge scales cannot
    be folded into a BatchNorm's running variance in floating point.
    """
    s = a.pow(2).mean(dim=1).sqrt()
    s = torch.where(a.mean(dim=1) < 0, -s, s)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return a / s[:, None], s


def _rank1(weights: list[torch.Tensor], chunk: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per output channel, the top singular pair of the stacked members (exact optimum).

    Output channels are solved in chunks so temporaries stay a fraction of the group's size.
    """
    co = weights[0].shape[0]
    anchor = torch.empty(weights[0].shape, dtype=torch.float32)
    scales = torch.empty(co, len(weights), dtype=torch.float64)
    flat_anchor = anchor.view(co, -1)
    for lo in range(0, co, chunk):
        hi = min(lo + chunk, co)
        m = torch.stack([w[lo:hi].reshape(hi - lo, -1).float() for w in weights], dim=1)  # (c, L, K)
        gram = (m @ m.transpose(1, 2)).double()  # (c, L, L): small, so solve it in double
        _, vecs = torch.linalg.eigh(gram)
        a = vecs[..., -1]  # (c, L) unit-norm top eigenvector; w = a^T m is the matching row
        a, s = _normalise_scales(a)
        flat_anchor[lo:hi] = torch.einsum("cl,clk->ck", (a * s[:, None] * s[:, None]).float(), m)
        scales[lo:hi] = a
    dtype = weights[0].dtype
    return anchor.to(dtype), [scales[:, i].to(dtype).contiguous() for i in range(len(weights))]


def _als(
    weights: list[torch.Tensor], shape: tuple[int, ...], iters: int, tol: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Alternating least squares when members cover different leading slices of the anchor."""
    # Start from the largest member: a mean of members with opposite-sign channels can
    # be near zero, a poor start for this non-convex problem.
    anchor = _masked_mean(weights, shape)
    largest = max(weights, key=lambda w: w.numel())
    anchor[: largest.shape[0], : largest.shape[1]] = largest
    scales = [torch.ones(w.shape[0]) for w in weights]
    for _ in range(iters):
        for i, w in enumerate(weights):  # a-step: per-channel projection on the anchor slice
            g = _slice(anchor, w)
            den = g.pow(2).sum(dim=(1, 2, 3))
            scales[i] = torch.where(den > 0, (w * g).sum(dim=(1, 2, 3)) / den.clamp_min(1e-30), torch.ones_like(den))
        num = torch.zeros(shape)
        den = torch.zeros(shape)
        for w, a in zip(weights, scales, strict=True):  # W-step: weighted mean of the members
            a4 = a.view(-1, 1, 1, 1)
            num[: w.shape[0], : w.shape[1]] += a4 * w
            den[: w.shape[0], : w.shape[1]] += a4 * a4
        new = torch.where(den > 0, num / den.clamp_min(1e-30), anchor)
        change = (new - anchor).norm() / anchor.norm().clamp_min(1e-30)
        anchor = new
        if change < tol:
            break
    # Normalise: mean scale 1 per anchor output channel over the members that use it.
    total = torch.zeros(shape[0])
    count = torch.zeros(shape[0])
    for a in scales:
        total[: a.shape[0]] += a
        count[: a.shape[0]] += 1
    s = total / count.clamp_min(1)
    s = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
    anchor = anchor * s.view(-1, 1, 1, 1)
    return anchor, [a / s[: a.shape[0]] for a in scales]


def _patches(
    m: torch.nn.Conv2d | torch.nn.Linear, x: torch.Tensor, rows: int | None = None, seed: int = 0
) -> torch.Tensor:
    """The (N*L, K) matrix of input patches a conv multiplies by its flattened kernel.

    With ``rows``, at most that many output positions, drawn without replacement (seeded), are
    gathered directly from the padded input: unfolding a 224 px map only to keep a fraction
    of its rows costs more than the moments themselves.
    """
    import torch.nn.functional as F

    if isinstance(m, torch.nn.Linear):  # a 1x1 conv over its positions: each position is a patch
        flat = x.float().reshape(-1, m.in_features)
        if rows is None or flat.shape[0] <= rows:
            return flat
        idx = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:rows].to(x.device)
        return flat[idx]
    assert not isinstance(m.padding, str), "callers pass convs with numeric padding (_act_ready)"
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    n, _, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if rows is None or n * ho * wo <= rows:
        p = F.unfold(x.float(), m.kernel_size, m.dilation, m.padding, m.stride)  # (N, K, L)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    idx = torch.randperm(n * ho * wo, generator=torch.Generator().manual_seed(seed))[:rows].to(x.device)
    b, oy, ox = idx // (ho * wo), idx % (ho * wo) // wo, idx % wo
    xp = F.pad(x.float(), (pw, pw, ph, ph))
    iy = oy[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # (R, kh)
    ix = ox[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # (R, kw)
    p = xp[b[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (R, kh, kw, C)
    return p.permute(0, 3, 1, 2).reshape(rows, -1)


def _run_batches(models: list[torch.nn.Module], batches: Iterable, num_batches: int) -> None:
    """Run every model, in eval mode and without gradients, on the same batches; modes restored."""
    device = next(models[0].parameters()).device
    with mode(*models), torch.no_grad():
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            x = inputs_of(batch).to(device)
            for model in models:
                model(x)


def input_moments(
    model: torch.nn.Module,
    names: list[str],
    batches: Iterable,
    num_batches: int,
    student: torch.nn.Module | None = None,
    max_rows: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named conv, (H, C): second moments of the input patches it sees, and the cross term.

    Sums are kept in float64. At most ``max_rows`` patch positions per batch and conv are
    used (a fixed, seeded sample, the same for teacher and student; default max(8192, 2 d)
    for patches of d values): at 224 px an early stage has ~3,000 positions per image, far
    more than a d x d moment needs, and the products dominate the cost.

    Without ``student``, H = C = sum x x^T over the patches ``model`` feeds the conv. With a
    (partially converted) ``student`` holding convs of the same names, H = sum s s^T over the
    student's patches and C = sum t s^T pairs them with the teacher's (``model``'s) patches,
    for the sequential fit. Both are divided by the mean eigenvalue of H (trace / K) so that no
    layer dominates the fit by scale.
    """
    teacher_mods = dict(model.named_modules())
    student_mods = dict(student.named_modules()) if student is not None else teacher_mods
    latest: dict[str, torch.Tensor] = {}
    sums: dict[str, list[torch.Tensor]] = {}
    calls: dict[tuple[str, bool], int] = {}

    def sample(name: str, m: torch.nn.Conv2d | torch.nn.Linear, x: torch.Tensor, side: bool) -> torch.Tensor:
        i = calls[name, side] = calls.get((name, side), -1) + 1
        if isinstance(m, torch.nn.Linear):
            d = m.in_features
        else:
            d = m.in_channels // m.groups * math.prod(m.kernel_size)
        rows = max_rows if max_rows is not None else max(8192, 2 * d)
        return _patches(m, x, rows, seed=i * 7919 + names.index(name))

    def teacher_hook(name: str) -> Callable:
        def fn(m: torch.nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            t = sample(name, m, inp[0], False)
            if student is None:
                _accumulate(sums, name, t, t)
            else:
                latest[name] = t

        return fn

    def student_hook(name: str) -> Callable:
        def fn(m: torch.nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            _accumulate(sums, name, sample(name, m, inp[0], True), latest.pop(name))

        return fn

    handles = [teacher_mods[n].register_forward_hook(teacher_hook(n)) for n in names]
    if student is not None:
        handles += [student_mods[n].register_forward_hook(student_hook(n)) for n in names]
    try:
        _run_batches([model] if student is None else [model, student], batches, num_batches)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in list(sums):
        h, c = sums.pop(name)
        norm = h.diagonal().mean().clamp_min(1e-12)
        hn = h.div_(norm).cpu()  # the fits run on the CPU in float64, whatever device the model is on
        out[name] = (hn, hn if c is h else c.div_(norm).cpu())
    return out


def _accumulate(sums: dict[str, list[torch.Tensor]], name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    """sums[name] += (s^T s, t^T s) in float64, reusing one buffer when s is t.

    Each batch's product is formed in float32 (fast) and added to a float64 sum, so that
    rounding does not grow with the number of batches.
    """
    if name not in sums:
        h = (s.T @ s).double()
        sums[name] = [h, h if t is s else (t.T @ s).double()]
        return
    h, c = sums[name]
    h += s.T @ s
    if c is not h:
        c += t.T @ s


def fit_activations(
    weights: list[torch.Tensor],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    iters: int = 3,
    ridge: float = 0.05,
    extra: list[torch.Tensor | None] | None = None,
) -> Fit:
    """Data-aware anchor: min sum_l ||diag(a_l) W_G S_l - W_l T_l||^2 + ridge ||W_G - W_fit||^2.

    T_l are the input patches member l sees in the original model and S_l those it sees in
    the student (S = T unless fitted sequentially), given as (H_l, C_l) = (S S^T, T S^T) from
    :func:`input_moments`. The anchor step is closed form,
    W_G = (sum_l c_l H_l + ridge I)^-1 (sum_l C_l^T W_l^T diag(a_l) + ridge W_fit), with c_l the
    mean squared scale of member l (one matrix shared by all output channels); the scale step
    is a data-weighted projection. ``extra`` (per member, a kernel of the members' shape or None)
    is what each member computes beside the anchor before its scale, e.g. its fitted adapter
    regulator at the centre tap: the fit is then of diag(a_l) (W_G + E_l) S_l to W_l T_l. The
    ridge pulls the anchor towards the weight-space fit ``W_fit`` in input directions the
    calibration data never excites, so the anchor does not overfit a few batches. Errors
    reported are weight-space errors, as for ``fit``.
    """
    shape = tuple(weights[0].shape)
    co = shape[0]
    start = fit_scaled(weights, shape)
    prior = start.anchor.reshape(co, -1).double()
    anchor = prior
    scales = [s.double() if s is not None else torch.ones(co, dtype=torch.float64) for s in start.scales]
    flat = [w.reshape(co, -1).double() for w in weights]
    targets = [w @ c for w, (_, c) in zip(flat, moments, strict=True)]  # W_l T_l S_l^T, fixed
    beside = [e.reshape(co, -1).double() if e is not None else None for e in (extra or [None] * len(weights))]  # E_l
    beside_h = [e @ h.double() if e is not None else None for e, (h, _) in zip(beside, moments, strict=True)]
    eye = torch.eye(prior.shape[1], dtype=torch.float64)
    for _ in range(iters):
        lhs = sum(float(a.pow(2).mean()) * h for a, (h, _) in zip(scales, moments, strict=True)) + ridge * eye
        rhs = (
            sum(
                (t - a[:, None] * eh if eh is not None else t) * a[:, None]
                for t, a, eh in zip(targets, scales, beside_h, strict=True)
            )
            + ridge * prior
        )
        anchor = torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric
        for i, (t, (h, _)) in enumerate(zip(targets, moments, strict=True)):
            v = anchor + beside[i] if beside[i] is not None else anchor
            den = ((v @ h) * v).sum(dim=1)
            scales[i] = torch.where(den > 1e-12, (t * v).sum(dim=1) / den.clamp_min(1e-12), scales[i])
        a, r = _normalise_scales(torch.stack(scales, dim=1))
        scales = list(a.unbind(dim=1))
        anchor = anchor * r[:, None]
        # diag(a) (W_G + E) is unchanged when a moves into the anchor only if E moves with it
        beside = [e * r[:, None] if e is not None else None for e in beside]
        beside_h = [e * r[:, None] if e is not None else None for e in beside_h]
    out_anchor = anchor.reshape(shape).float()
    out_scales: list[torch.Tensor | None] = [a.float() for a in scales]
    return Fit(out_anchor, out_scales, _errors(weights, out_anchor, out_scales))


@dataclass
class BankFit:
    """A filter bank, each member's 1x1 coefficients, and how well they reproduce the members.

    Attributes:
        bank: (k, C_in, kh, kw), the shared filters.
        coefficients: per member, (C_out, k).
        energy: the fraction of the (whitened) stacked kernels' energy the k filters capture.
        errors: per member, the relative output error ||(W_l - C_l B) X_l|| / ||W_l X_l|| on the
            calibration inputs X_l (without data: the relative weight error).
    """

    bank: torch.Tensor
    coefficients: list[torch.Tensor]
    energy: float
    errors: list[float]


@dataclass(frozen=True)
class Spectrum:
    """The eigendecomposition of a matrix's smaller Gram matrix, from which every truncation is read."""

    a: torch.Tensor
    evals: torch.Tensor  # ascending, as eigh returns them
    vecs: torch.Tensor
    rows: bool  # the Gram is a a^T (rows <= cols), else a^T a

    @classmethod
    def of(cls, a: torch.Tensor) -> Spectrum:
        rows = a.shape[0] <= a.shape[1]
        evals, vecs = torch.linalg.eigh(a @ a.T if rows else a.T @ a)
        return cls(a, evals, vecs, rows)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k Sigma_k, V_k^T, all singular values), leading first."""
        k = min(k, *self.a.shape)
        sigma = self.evals.flip(0).clamp_min(0).sqrt()
        if self.rows:
            u = self.vecs[:, -k:].flip(1)
            return u * 1.0, u.T @ self.a, sigma
        v = self.vecs[:, -k:].flip(1)
        return self.a @ v, v.T * 1.0, sigma


def _top_singular(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k Sigma_k, V_k^T, all singular values) of ``a`` from the eigendecomposition of its smaller Gram matrix.

    Several times faster than a full SVD on CPU for the wide (n C_out x C_in kh kw) matrices of a
    bank; in float64 the squared condition number costs nothing in the leading components, and
    C B = U_k U_k^T a (or a V_k V_k^T) stays an exact projection, so full rank reproduces ``a``.
    """
    return Spectrum.of(a).top(k)


@dataclass(frozen=True)
class BankBasis:
    """What a bank's fit computes before choosing its size k: the stacked kernels, the whitening factor and the
    spectrum of the whitened stack. :func:`fit_bank` at any k reads it (a search over k decomposes once)."""

    m: torch.Tensor  # (sum C_out, d), float64
    s: torch.Tensor | None  # cholesky of the summed, ridged moments; None without moments
    spectrum: Spectrum


def bank_basis(
    weights: list[torch.Tensor], moments: list[torch.Tensor] | None = None, ridge: float = 1e-3
) -> BankBasis:
    """The size-independent part of :func:`fit_bank` for these members (same arguments)."""
    d = weights[0][0].numel()
    m = torch.cat([w.reshape(w.shape[0], -1).double() for w in weights])  # (sum co, d)
    s = None
    if moments is not None:
        h = torch.stack([hl.double() for hl in moments]).sum(0)
        h = h + ridge * float(h.diagonal().mean()) * torch.eye(d, dtype=torch.float64)
        s = torch.linalg.cholesky(h)
    return BankBasis(m, s, Spectrum.of(m @ s if s is not None else m))


class BasisCache:
    """:class:`BankBasis` of each group of members, kept across conversions that fit the same members at several
    bank sizes with the same input moments (the budget search's candidates): the whitening and the decomposition
    are the costly part of a fit (for a 3x3 conv of 512 channels, a 4608 x 4608 Cholesky and product), the
    truncation to k is cheap. Holds at most ``max_bytes``; a basis that would pass it is used once, not kept."""

    def __init__(self, max_bytes: int = BASIS_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.bases: dict[tuple[Any, ...], BankBasis] = {}
        self.hits = 0

    def get(
        self,
        members: tuple[str, ...],
        sources: Sequence[torch.Tensor],
        weights: list[torch.Tensor],
        moments: list[torch.Tensor] | None,
    ) -> BankBasis:
        """The basis of ``weights`` (the members' kernels, read from ``sources``: the layers' own weight tensors)
        whitened by ``moments``, made once per members, sources' storage and version, and moments' identity."""
        key = (members, tuple((t.data_ptr(), t._version) for t in sources), tuple(id(h) for h in moments or ()))
        if key in self.bases:
            self.hits += 1
            return self.bases[key]
        basis = bank_basis(weights, moments)
        size = sum(
            t.numel() * t.element_size()
            for t in (basis.m, basis.s, basis.spectrum.a, basis.spectrum.vecs)
            if t is not None
        )
        if self.bytes + size <= self.max_bytes:
            self.bases[key] = basis
            self.bytes += size
        return basis

    def release(self) -> None:
        """Drop every kept basis."""
        self.bases, self.bytes = {}, 0


@dataclass(frozen=True)
class BankSpectrum:
    """How much of each member's kernel energy the leading k components of its group capture, for every k.

    ``captured[l, j]`` is the energy of member l's kernel along the j-th principal direction of the
    stacked kernels (the SVD's, leading first), ``norms[l]`` its total energy. The weight-space fit
    of a bank of k filters (:func:`fit_bank` without moments) leaves member l the relative error
    sqrt(1 - sum_{j<k} captured[l, j] / norms[l]): one decomposition prices every bank size.
    """

    captured: torch.Tensor  # (members, components), float64
    norms: torch.Tensor  # (members,), float64

    def errors(self, k: int) -> list[float]:
        """Per member, the relative weight error of the best bank of ``k`` filters."""
        kept = self.captured[:, :k].sum(1)
        rel = (1 - kept / self.norms.clamp_min(1e-300)).clamp(0, 1).sqrt()
        return [float(e) if n > 0 else 0.0 for e, n in zip(rel, self.norms, strict=True)]


def bank_spectrum(weights: list[torch.Tensor]) -> BankSpectrum:
    """The :class:`BankSpectrum` of ``weights``, from the smaller Gram matrix of the stacked kernels.

    For scoring, not fitting: the Gram product runs in the weights' float32 (a VGG head's
    4096 x 25088 matrix would take 822 MB more in float64), the decomposition in float64; one
    member needs the eigenvalues only (its energy along component j is sigma_j^2).
    """
    m = weights[0].reshape(weights[0].shape[0], -1).float()
    if len(weights) > 1:
        m = torch.cat([w.reshape(w.shape[0], -1).float() for w in weights])
    rows, cols = m.shape
    gram = (m @ m.T if rows <= cols else m.T @ m).double()
    offsets = [0, *itertools.accumulate(w.shape[0] for w in weights)]
    if rows <= cols:  # each member's energy is the trace of its block: no float64 copy of a wide matrix
        diag = gram.diagonal()
        norms = torch.stack([diag[lo:hi].sum() for lo, hi in itertools.pairwise(offsets)])
    else:
        norms = torch.stack([w.reshape(w.shape[0], -1).double().pow(2).sum() for w in weights])
    if len(weights) == 1:
        return BankSpectrum(torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)[None, :], norms)
    evals, vecs = torch.linalg.eigh(gram)
    if rows <= cols:  # M = U S V^T: member l's rows keep sum_j s_j^2 |U_lj|^2 along component j
        energy = vecs.flip(1).pow(2) * evals.flip(0).clamp_min(0)[None, :]
    else:  # project each member's rows on the leading right singular vectors
        energy = (m.double() @ vecs.flip(1)).pow(2)
    captured = torch.stack([energy[lo:hi].sum(0) for lo, hi in itertools.pairwise(offsets)])
    return BankSpectrum(captured, norms)


def fit_bank(
    weights: list[torch.Tensor],
    k: int,
    moments: list[torch.Tensor] | None = None,
    ridge: float = 1e-3,
    refit: bool = False,
    basis: BankBasis | None = None,
    errors: bool = True,
) -> BankFit:
    """Closed-form bank B and coefficients C_l minimising sum_l ||(W_l - C_l B) X_l||^2, whitened.

    Basis Sharing (Wang et al. 2024) with SVD-LLM's whitening, applied to convolutions: with
    H = sum_l H_l + ridge * mean(diag) * I, H_l the second moments of member l's input patches
    (each normalised to mean eigenvalue 1, as :func:`input_moments` returns them) and
    S = cholesky(H), take the truncated SVD  [W_1; ...; W_n] S = U Sigma V^T; then
    C = U_k Sigma_k (split by member) and B = V_k^T S^-1 — the optimum when every member sees
    the same input statistics. With ``refit``, each C_l is then refitted to its own H_l with B
    fixed (a k x k solve), which lowers every member's output error on its calibration inputs
    (not yet the default: its effect on accuracy is still to be measured, and the committed
    benchmarks ran without it). Without ``moments``, S = I: the best rank-k fit of the kernels. Everything is
    solved in float64; each bank
    filter is rescaled to the members' mean filter norm (the coefficients absorb it) so that
    both factors train at the scale of the original kernels.

    With k = min(n * C_out, C_in * kh * kw) the members are reproduced exactly. ``basis``: the same members'
    :func:`bank_basis` (with the same moments and ridge), decomposed once for fits at several k. ``errors``
    False leaves :attr:`BankFit.errors` empty (a search that only runs the result saves a d x d product per member).
    """
    shape = tuple(weights[0].shape)
    co = [w.shape[0] for w in weights]
    basis = bank_basis(weights, moments, ridge) if basis is None else basis
    m, s = basis.m, basis.s
    c, b, sigma = basis.spectrum.top(k)
    k = c.shape[1]
    if s is not None:  # B = V_k^T S^-1, i.e. S^T B^T = V_k
        b = torch.linalg.solve_triangular(s.T, b.T, upper=True).T
    target = m.norm(dim=1).mean().clamp_min(1e-12)
    r = b.norm(dim=1).clamp_min(1e-30) / target
    b, c = b / r[:, None], c * r[None, :]
    energy = float(sigma[:k].pow(2).sum() / sigma.pow(2).sum().clamp_min(1e-300))
    offsets = [0, *itertools.accumulate(co)]
    bounds = list(zip(offsets[:-1], offsets[1:], strict=True))
    if refit and moments is not None and len(weights) > 1:
        # The SVD is optimal for the summed H; with B fixed, each member's own optimum is a k x k
        # solve: C_l = W_l H_l B^T (B H_l B^T)^-1 (never worse on member l's inputs).
        for i, (lo, hi) in enumerate(bounds):
            hb = moments[i].double() @ b.T  # (d, k)
            gram = b @ hb
            gram = gram + 1e-9 * float(gram.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
            c[lo:hi] = torch.linalg.solve(gram, (m[lo:hi] @ hb).T).T
    found: list[float] = []
    if errors:
        approx = c @ b
        for i, (lo, hi) in enumerate(bounds):
            e, w = m[lo:hi] - approx[lo:hi], m[lo:hi]
            if moments is not None:
                hl = moments[i].double()
                num, den = ((e @ hl) * e).sum(), ((w @ hl) * w).sum()
            else:
                num, den = e.pow(2).sum(), w.pow(2).sum()
            found.append(float((num.clamp_min(0) / den).sqrt()) if den > 0 else 0.0)
    coeffs = [c[lo:hi].float().contiguous() for lo, hi in bounds]
    return BankFit(b.reshape(k, *shape[1:]).float().contiguous(), coeffs, energy, found)


@dataclass
class AdapterFit:
    """A parallel (adapter) regulator's 1x1 kernel and how much of the member's residual it removes.

    Attributes:
        kernel: (C_out, C_in, 1, 1), the regulator conv's weight.
        before, after: the member's relative output error without and with the regulator, on the
            calibration inputs when moments were given, else in weight space.
    """

    kernel: torch.Tensor
    before: float
    after: float


def centre_tap(
    kernel_size: tuple[int, int], padding: tuple[int, int] | str, dilation: tuple[int, int]
) -> tuple[int, int] | None:
    """The kernel tap that reads the input pixel a stride-matched 1x1 conv reads, or None.

    A conv with padding p, dilation r and stride s reads input (i s - p + u r) at tap u; the
    regulator's 1x1 at the same stride reads (i s): the taps with u r = p (3x3, padding 1: the
    centre; 1x1, padding 0: the only tap). Kernels without such a tap (a 2x2, ``padding="same"``)
    give None.
    """
    if isinstance(padding, str):
        return None
    tap = []
    for k, p, r in zip(kernel_size, padding, dilation, strict=True):
        if p % r or not 0 <= p // r < k:
            return None
        tap.append(p // r)
    return tap[0], tap[1]


def fit_adapter(
    target: torch.Tensor,
    current: torch.Tensor,
    tap: tuple[int, int],
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    ridge: float = 1e-3,
) -> AdapterFit:
    """The 1x1 kernel R that best adds to a conv so that ``current`` behaves as ``target``.

    An adapter regulator adds R x_c (x_c: the input pixel at the kernel's ``tap``, see
    :func:`centre_tap`) to the member's anchored output V * x. With the member's input moments
    (H, C) = (S S^T, T S^T) (student patches S, original patches T: :func:`input_moments`) it
    solves  min_R ||R S_c + V S - W T||^2  in closed form,
    R = (W C[:, c] - V H[:, c]) (H[c, c] + ridge I)^-1, in float64; without moments (white
    inputs) R is the residual's tap, (W - V)[:, :, tap]. Both kernels are (C_out, C_in, kh, kw)
    in the member's own output units (the anchor's folded scale already divided out of W).
    """
    co, ci, kh, kw = target.shape
    w = target.reshape(co, -1).double()
    v = current.reshape(co, -1).double()
    idx = torch.arange(ci) * (kh * kw) + tap[0] * kw + tap[1]  # the tap of every input channel
    if moments is None:
        r = (w - v)[:, idx]
        e_before = (w - v).pow(2).sum()
        e_after = (w - v).pow(2).sum() - r.pow(2).sum()
        den = w.pow(2).sum()
    else:
        h, c = (m.double() for m in moments)
        hcc = h[idx][:, idx]
        hcc = hcc + ridge * float(hcc.diagonal().mean().clamp_min(1e-12)) * torch.eye(ci, dtype=torch.float64)
        r = torch.linalg.solve(hcc, (w @ c[:, idx] - v @ h[:, idx]).T).T
        # errors are reported on H alone (the original's inputs when S = T), as fit_bank reports them
        d = w - v
        full = v.clone()
        full[:, idx] += r
        e_before = ((d @ h) * d).sum()
        e_after = (((w - full) @ h) * (w - full)).sum()
        den = ((w @ h) * w).sum()

    def ratio(e: torch.Tensor) -> float:
        return float((e.clamp_min(0) / den).sqrt()) if den > 0 else 0.0

    return AdapterFit(r.float().reshape(co, ci, 1, 1).contiguous(), ratio(e_before), ratio(e_after))


def fit_anchor_and_adapters(
    weights: list[torch.Tensor],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    tap: tuple[int, int],
    fitted: list[bool],
    rounds: int = 3,
) -> tuple[Fit, list[AdapterFit | None]]:
    """An anchor and the members' adapter regulators fitted together, by alternating least squares.

    The anchor alone (:func:`fit_activations`) leaves each member a residual its adapter then
    takes in part (:func:`fit_adapter`); fitted again knowing the adapters, the anchor need no
    longer cover what they cover. Each round fits the anchor and scales given the adapters, then
    every adapter given the anchor; ``fitted[l]`` says whether member l has an adapter. The
    adapters returned are fitted to the anchor returned.
    """
    co, ci, kh, kw = weights[0].shape
    idx = torch.arange(ci) * (kh * kw) + tap[0] * kw + tap[1]
    extra: list[torch.Tensor | None] = [None] * len(weights)
    adapters: list[AdapterFit | None] = [None] * len(weights)
    for _ in range(rounds):
        fit = fit_activations(weights, moments, extra=extra)
        for i, (w, a) in enumerate(zip(weights, fit.scales, strict=True)):
            if not fitted[i]:
                continue
            scale = a if a is not None else torch.ones(co)
            safe = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
            adapters[i] = found = fit_adapter(w / safe.view(-1, 1, 1, 1), fit.anchor, tap, moments[i])
            e = torch.zeros(co, ci * kh * kw)
            e[:, idx] = found.kernel[:, :, 0, 0]
            extra[i] = e.reshape(co, ci, kh, kw)
    return fit, adapters
