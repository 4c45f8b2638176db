"""RaPP scores against NumPy, thresholds against brute force, statistics across processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from rae_lightning import AutoEncoder, VariationalAutoEncoder
from rae_lightning.networks import PlainLayer, ResidualUnit
from rae_lightning.scoring import NAPStatistics, f1_optimal_threshold, quantile_threshold

RTOL = 1e-6


def _np_apply(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The module's eval-mode forward pass, written again in NumPy from its weights."""
    if isinstance(module, nn.Linear):
        return (
            x @ module.weight.detach().double().numpy().T + module.bias.detach().double().numpy()
        )
    if isinstance(module, nn.BatchNorm1d):
        mean = module.running_mean.double().numpy()
        var = module.running_var.double().numpy()
        gamma = module.weight.detach().double().numpy()
        beta = module.bias.detach().double().numpy()
        return (x - mean) / np.sqrt(var + module.eps) * gamma + beta
    if isinstance(module, nn.LeakyReLU):
        return np.where(x > 0, x, module.negative_slope * x)
    if isinstance(module, PlainLayer):
        return _np_apply(module.act, _np_apply(module.norm, _np_apply(module.linear, x)))
    if isinstance(module, ResidualUnit):
        return x + _np_apply(module.branch, x)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _np_apply(child, x)
        return x
    raise TypeError(f"no NumPy version of {type(module).__name__}")


def _np_pathway(stack: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """x, then the output of every block of the stack, then the stack's output."""
    feats = [x]
    for block in stack.blocks:
        feats.append(_np_apply(block, feats[-1]))
    feats.append(_np_apply(stack.head, feats[-1]))
    return feats


def _np_diffs(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    enc, dec = model.net.encoder, model.net.decoder
    code = _np_pathway(enc, x)[-1]
    if isinstance(model, VariationalAutoEncoder):
        code = code[:, : model.hparams.latent_dim]  # the posterior mean
    x_hat = _np_pathway(dec, code)[-1]
    return [a - b for a, b in zip(_np_pathway(enc, x), _np_pathway(enc, x_hat), strict=True)]


def _randomise(model: nn.Module) -> None:
    """Fixed, non-trivial weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


# Widths of the pathway RaPP compares for n_layers=4, input 7, width 6, code 2, written out
# by hand: x; a plain encoder's three hidden layers, or a residual encoder's input
# projection and its one residual unit (two Linear layers); the code (a VAE: mean and
# log-variance, 2 x 2).
PLAIN_PATHWAY = [7, 6, 6, 6, 2]
RESIDUAL_PATHWAY = [7, 6, 6, 2]


@pytest.mark.parametrize(
    ("cls", "residual", "n_train", "widths"),
    [
        pytest.param(AutoEncoder, False, 40, PLAIN_PATHWAY, id="ae"),
        pytest.param(AutoEncoder, True, 40, RESIDUAL_PATHWAY, id="rae"),
        pytest.param(VariationalAutoEncoder, False, 40, [7, 6, 6, 6, 4], id="vae"),
        pytest.param(VariationalAutoEncoder, True, 40, [7, 6, 6, 4], id="rvae"),
        # 5 samples: the difference covariances are rank-deficient, so the cutoff matters
        pytest.param(AutoEncoder, True, 5, RESIDUAL_PATHWAY, id="rae-rank-deficient"),
    ],
)
def test_sap_and_nap_match_numpy(cls, residual: bool, n_train: int, widths: list[int]) -> None:
    model = cls(input_dim=7, hidden_dim=6, latent_dim=2, n_layers=4, residual=residual)
    _randomise(model)
    model.eval()
    rng = np.random.default_rng(1)
    x_train = rng.normal(size=(n_train, 7))
    x_test = rng.normal(size=(9, 7))

    # two labelled batches, so the statistics are accumulated across batches; each also
    # holds far-off samples labelled 1 (anomalies), which the statistics must leave out
    batches = []
    for x in np.array_split(x_train, 2):
        far = rng.normal(size=(3, 7)) * 50
        xb = torch.as_tensor(np.concatenate([x, far]), dtype=torch.float32)
        yb = torch.cat([torch.zeros(len(x), dtype=torch.long), torch.ones(3, dtype=torch.long)])
        batches.append((xb, yb))
    model.fit_nap_statistics(batches)
    with torch.no_grad():
        terms, _ = model.score_batch(torch.as_tensor(x_test, dtype=torch.float32))

    train_diffs = _np_diffs(model, x_train.astype(np.float32).astype(np.float64))
    test_diffs = _np_diffs(model, x_test.astype(np.float32).astype(np.float64))
    assert [d.shape[1] for d in test_diffs] == widths
    assert [d.shape[1] for d in model.pathway(torch.zeros(2, 7))] == widths
    sap = sum((d**2).sum(axis=1) for d in test_diffs)
    nap = np.zeros(len(x_test))
    for train_d, test_d in zip(train_diffs, test_diffs, strict=True):
        centred = test_d - train_d.mean(axis=0)
        precision = np.linalg.pinv(np.cov(train_d, rowvar=False, bias=True), rcond=RTOL)
        nap += np.einsum("ni,ij,nj->n", centred, precision, centred)
    np.testing.assert_allclose(terms["sap"].numpy(), sap, rtol=1e-4)
    np.testing.assert_allclose(terms["nap"].numpy(), nap, rtol=1e-3)


def test_nap_statistics_summed_over_processes_equal_one_process() -> None:
    gen = torch.Generator().manual_seed(0)
    diffs = [torch.randn(30, 4, generator=gen) * 3 + 1, torch.randn(30, 2, generator=gen)]
    whole = NAPStatistics([4, 2])
    whole.update(diffs)
    whole.finalize()
    # two "processes", each with a share; the reduce sums a tensor over both
    parts = [NAPStatistics([4, 2]), NAPStatistics([4, 2])]
    parts[0].update([d[:11] for d in diffs])
    parts[1].update([d[11:] for d in diffs])
    # finalize reduces the count, then each layer's sum and outer-product sum, in order
    theirs = iter(
        [parts[1].count, parts[1].sum_0, parts[1].outer_0, parts[1].sum_1, parts[1].outer_1]
    )
    parts[0].finalize(reduce=lambda t: t + next(theirs))

    for name, value in whole.state_dict().items():
        torch.testing.assert_close(parts[0].state_dict()[name], value)
    assert bool(whole.ready)


def test_quantile_threshold_is_numpys_quantile() -> None:
    scores = torch.tensor([0.3, 2.0, 1.1, 0.7, 5.0, 0.2, 0.9])
    expected = np.quantile(scores.numpy().astype(np.float64), 0.8)
    assert quantile_threshold(scores, 0.8).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="q must be in"):
        quantile_threshold(scores, 1.5)


def test_f1_optimal_threshold_beats_every_cut() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    # rounded, so there are ties
    scores = np.round(rng.normal(size=200) + 1.2 * labels, 1)

    threshold = f1_optimal_threshold(torch.as_tensor(scores), torch.as_tensor(labels)).item()

    best = max(f1_score(labels, scores > t) for t in np.unique(scores) - 1e-9)
    assert f1_score(labels, scores > threshold) == pytest.approx(best)
    with pytest.raises(ValueError, match="no anomaly"):
        f1_optimal_threshold(torch.as_tensor(scores), torch.zeros(200, dtype=torch.long))


def test_f1_optimal_threshold_separates_adjacent_float32_scores() -> None:
    one = np.float32(1.0)
    above = np.nextafter(one, np.float32(2.0))
    scores = torch.tensor([0.5, above, np.nextafter(above, np.float32(2.0)), 3.0])
    labels = torch.tensor([0, 0, 1, 1])

    threshold = f1_optimal_threshold(scores, labels)

    assert threshold.dtype == torch.float32
    assert (scores > threshold).long().tolist() == [0, 0, 1, 1]
