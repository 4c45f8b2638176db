"""Anomaly scores beyond the input-space error, and thresholds on scores; torch only.

RaPP (Kim et al., ICLR 2020) feeds a sample ``x`` and its reconstruction ``x_hat`` through
the same encoder and compares the two along the way. With ``h_0 = x`` and ``h_i`` the
hidden representation after the i-th block of the encoder (the last one is the code), the
differences are ``d_i = h_i(x) - h_i(x_hat)``, one ``(batch, width_i)`` tensor per layer.

- SAP (simple aggregation): ``sum_i ||d_i||^2``.
- NAP (normalised aggregation): each ``d_i`` is centred with the mean of the differences on
  training normals and whitened with their covariance, then the squared norms are summed:
  ``sum_i (d_i - m_i)^T C_i^+ (d_i - m_i)``, where ``C_i^+`` is the pseudo-inverse that
  drops directions with eigenvalues below ``rtol`` times the largest (they carry no
  variance on normal data and would only amplify noise).

The statistics are whitened per layer rather than over all layers concatenated: a
``width x width`` covariance per layer stays well estimated from a few hundred normals,
where one covariance over every layer together (a thousand dimensions and more) would not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

DEFAULT_RTOL = 1e-6


def pathway_differences(feats_x: Sequence[Tensor], feats_x_hat: Sequence[Tensor]) -> list[Tensor]:
    """Layer-wise differences ``h_i(x) - h_i(x_hat)``; each ``(batch, width_i)``."""
    if len(feats_x) != len(feats_x_hat):
        raise ValueError(
            f"feats_x and feats_x_hat must have as many layers, got {len(feats_x)} "
            f"and {len(feats_x_hat)}"
        )
    return [a - b for a, b in zip(feats_x, feats_x_hat, strict=True)]


def sap_score(diffs: Sequence[Tensor]) -> Tensor:
    """Simple aggregation along the pathway: ``sum_i ||d_i||^2`` per sample, ``(batch,)``."""
    return torch.stack([d.pow(2).sum(dim=1) for d in diffs]).sum(dim=0)


def whitening(mean_outer: Tensor, mean: Tensor, rtol: float = DEFAULT_RTOL) -> Tensor:
    """The symmetric ``W`` ``(width, width)`` with ``W W`` the pseudo-inverse of a covariance.

    Args:
        mean_outer: mean of the outer products ``E[d d^T]``, ``(width, width)``.
        mean: mean ``E[d]``, ``(width,)``.
        rtol: eigenvalues at or below ``rtol`` times the largest are dropped.
    """
    cov = mean_outer - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    cutoff = rtol * eigvals.max().clamp_min(0.0)
    keep = eigvals > cutoff
    scale = torch.where(keep, eigvals.clamp_min(torch.finfo(eigvals.dtype).tiny).rsqrt(), 0.0)
    # the symmetric square root V diag(scale) V^T: unlike V diag(scale) it does not depend
    # on the eigenvectors' signs or on the basis chosen for repeated eigenvalues
    return (eigvecs * scale) @ eigvecs.T


class NAPStatistics(nn.Module):
    """Centring and whitening of the pathway differences, per layer, for NAP.

    Sufficient statistics (count, sum, sum of outer products, in float64) are accumulated
    with :meth:`update`, can be summed across processes, and are turned into the per-layer
    ``mean_i`` ``(width_i,)`` and ``whiten_i`` ``(width_i, width_i)`` buffers by
    :meth:`finalize`. Those buffers, and ``ready``, are saved in a ``state_dict``; the
    accumulators are not.

    Args:
        widths: width of every layer of the pathway, input first.
        rtol: relative eigenvalue cutoff of the pseudo-inverse (see :func:`whitening`).
    """

    def __init__(self, widths: Sequence[int], rtol: float = DEFAULT_RTOL) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        if not 0.0 <= rtol < 1.0:
            raise ValueError(f"rtol must be in [0, 1), got {rtol}")
        self.widths = list(widths)
        self.rtol = rtol
        self.register_buffer("ready", torch.tensor(False))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64), persistent=False)
        for i, w in enumerate(self.widths):
            self.register_buffer(f"mean_{i}", torch.zeros(w))
            self.register_buffer(f"whiten_{i}", torch.zeros(w, w))
            self.register_buffer(f"sum_{i}", torch.zeros(w, dtype=torch.float64), persistent=False)
            outer = torch.zeros(w, w, dtype=torch.float64)
            self.register_buffer(f"outer_{i}", outer, persistent=False)

    def reset(self) -> None:
        """Zero the accumulators; the finalized buffers stay until the next :meth:`finalize`."""
        self.count.zero_()
        for i in range(len(self.widths)):
            getattr(self, f"sum_{i}").zero_()
            getattr(self, f"outer_{i}").zero_()

    def update(self, diffs: Sequence[Tensor]) -> None:
        """Add a batch of pathway differences, one ``(batch, width_i)`` tensor per layer."""
        if len(diffs) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} layers, got {len(diffs)}")
        self.count += diffs[0].shape[0]
        for i, d in enumerate(diffs):
            d = d.detach().double()
            getattr(self, f"sum_{i}").add_(d.sum(dim=0))
            getattr(self, f"outer_{i}").add_(d.T @ d)

    def finalize(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Turn the accumulators into ``mean_i`` and ``whiten_i``.

        Args:
            reduce: sums a tensor over processes (an all-reduce under DDP); identity if None.
        """
        reduce = reduce or (lambda t: t)
        count = reduce(self.count.clone())
        if count.item() < 2:
            raise RuntimeError(f"NAP statistics need at least 2 samples, got {int(count.item())}")
        for i in range(len(self.widths)):
            mean = reduce(getattr(self, f"sum_{i}").clone()) / count
            mean_outer = reduce(getattr(self, f"outer_{i}").clone()) / count
            whiten = whitening(mean_outer, mean, self.rtol)
            getattr(self, f"mean_{i}").copy_(mean)
            getattr(self, f"whiten_{i}").copy_(whiten)
        self.ready.fill_(True)

    def score(self, diffs: Sequence[Tensor]) -> Tensor:
        """NAP per sample, ``(batch,)``: summed squared norms of the whitened differences."""
        if len(diffs) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} layers, got {len(diffs)}")
        total = torch.zeros(diffs[0].shape[0], dtype=diffs[0].dtype, device=diffs[0].device)
        for i, d in enumerate(diffs):
            mean = getattr(self, f"mean_{i}").to(d.dtype)
            whiten = getattr(self, f"whiten_{i}").to(d.dtype)
            total = total + ((d - mean) @ whiten).pow(2).sum(dim=1)
        return total


def quantile_threshold(normal_scores: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of the scores of normal samples ``(n,)``: a scalar tensor."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if normal_scores.numel() == 0:
        raise ValueError("normal_scores is empty; a quantile threshold needs normal samples")
    return torch.quantile(normal_scores.double(), q).to(normal_scores.dtype)


def f1_optimal_threshold(scores: Tensor, labels: Tensor) -> Tensor:
    """The threshold ``t`` maximising F1 of the decisions ``score > t``: a scalar tensor.

    Candidates are the scores themselves: ``t`` equal to the highest score left unflagged
    flags exactly the scores above it (and a value below the lowest flags all), so every
    achievable split of the sorted scores is tried once, exactly in the scores' dtype.

    Args:
        scores: ``(n,)`` anomaly scores, higher is more anomalous.
        labels: ``(n,)`` 1 for anomalies, 0 for normals.
    """
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-d of one shape, got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    positives = (labels == 1).sum().double()
    if positives == 0:
        raise ValueError("labels hold no anomaly; an F1-optimal threshold needs some")
    values, order = torch.sort(scores, descending=True)
    hits = (labels[order] == 1).double()

    # cutting after position k flags the k + 1 highest scores; cut only between distinct values
    tp = torch.cumsum(hits, dim=0)
    n_flagged = torch.arange(1, len(values) + 1, dtype=torch.float64, device=values.device)
    f1 = 2 * tp / (n_flagged + positives)
    lowest = values[-1:] - 1.0 - values[-1:].abs()
    cut = torch.cat([values[1:], lowest])
    valid = torch.cat([values[:-1] > values[1:], torch.ones_like(lowest, dtype=torch.bool)])
    f1 = torch.where(valid, f1, -1.0)
    return cut[torch.argmax(f1)].to(scores.dtype)
