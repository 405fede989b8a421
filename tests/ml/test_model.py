"""The classifier: metrics, normalisation, calibration, and training on our own detections."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ml.metrics import binary_nll, roc_auc, roc_curve
from pipeline.ml.model import (
    MASK_LEVEL,
    BatchNorm2d,
    ConvReLU,
    ModelConfig,
    RealBogusNet,
    _arcsinh_inplace,
    _conv_relu_op,
    fit_temperature,
    fold_batchnorm,
    normalise_triplets,
)
from pipeline.ml.train import (
    TrainConfig,
    _better,
    load_model,
    train_model,
    training_inputs,
)


def test_roc_auc_and_curve_on_known_values():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert roc_auc(np.ones(4), labels) == pytest.approx(0.5)  # ties count half
    fpr, tpr, thresholds = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thresholds[0] == np.inf and thresholds[1] == 0.8
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(scores, np.ones(4))
    assert binary_nll(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(np.log(2))


def test_roc_auc_counts_every_pair_with_partial_ties():
    # against the definition: P(score of a real > score of a bogus) + P(equal) / 2
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 300).astype(np.float32)  # many ties within and across
    labels = rng.random(300) < 0.4
    real, bogus = scores[labels][:, None], scores[~labels][None, :]
    pairs = np.mean(real > bogus) + 0.5 * np.mean(real == bogus)
    assert roc_auc(scores, labels) == pytest.approx(pairs, abs=1e-12)


def test_temperature_recovers_the_overconfidence_it_was_given():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20000)
    labels = rng.random(20000) < 1 / (1 + np.exp(-true_logits))
    assert fit_temperature(3.0 * true_logits, labels) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(true_logits, np.ones(10)) == 1.0


def test_normalisation_removes_flux_units_and_handles_empty_stamps():
    rng = np.random.default_rng(2)
    stamps = rng.normal(100, 5, (2, 3, 63, 63)).astype(np.float32)
    stamps[1] = stamps[0] * 40 + 7  # another survey's units and sky
    stamps[0, 1] = 0.0  # a fully masked reference stamp
    out = normalise_triplets(stamps)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out[1, 0], out[0, 0], atol=1e-4)
    assert np.all(out[0, 1] == 0)
    with pytest.raises(ValueError, match=r"\(n, 3, h, w\)"):
        normalise_triplets(np.zeros((2, 63, 63)))


@pytest.mark.parametrize("size", [63, 64, 21])
def test_normalisation_medians_are_numpys(size: int) -> None:
    """The sort-based medians give np.nanmedian's over the valid pixels exactly."""
    rng = np.random.default_rng(size)
    stamps = rng.normal(50, 8, (40, 3, size, size)).astype(np.float32)
    stamps[3, 0, 4, 4], stamps[5, 2, 0, 0], stamps[6, 1, 9, 9] = np.nan, np.inf, -np.inf
    stamps[7, 2] = 0.0  # flat: no valid pixel, the stamp stays 0
    stamps[8, 1, :, : size // 2] = 0.0  # half masked
    stamps[9, 0, ::2, ::2] = 0.0  # every sampled pixel masked: the spread fallback
    valid = np.isfinite(stamps) & (stamps != 0)
    x = np.where(valid, stamps, np.float32(0.0))
    sample = np.where(valid, x, np.nan)[:, :, ::2, ::2].reshape(40, 3, -1)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        median = np.nan_to_num(np.nanmedian(sample, axis=2))
        sigma = np.nan_to_num(1.4826 * np.nanmedian(np.abs(sample - median[..., None]), axis=2))
        fallback = np.nan_to_num(np.nanstd(sample, axis=2))
    sigma = np.where(sigma > 0, sigma, np.where(fallback > 0, fallback, 1.0))
    x -= median[..., None, None]
    x *= (1.0 / (3.0 * sigma))[..., None, None].astype(np.float32)
    x[~valid] = 0.0
    expected = np.arcsinh(np.clip(x, -1000 / 3.0, 1000 / 3.0))
    np.testing.assert_allclose(normalise_triplets(stamps), expected, rtol=2e-6, atol=2e-6)


def test_arcsinh_matches_the_double_precision_one_over_the_clipped_range():
    x = np.concatenate(
        [np.linspace(-1000 / 3.0, 1000 / 3.0, 200_001), np.linspace(-1e-3, 1e-3, 2001), [0.0]]
    ).astype(np.float32)  # the whole clipped range, and finely about zero
    out = x.copy()
    _arcsinh_inplace(out)
    exact = np.arcsinh(x.astype(np.float64))
    np.testing.assert_allclose(out, exact, rtol=0, atol=4e-7)
    assert np.array_equal(np.signbit(out), np.signbit(x))  # odd: -0 stays -0, signs kept
    assert out[-1] == 0.0
    grid = np.linspace(-50, 50, 4 * 3 * 7 * 5, dtype=np.float32).reshape(4, 3, 7, 5)
    original = grid.copy()
    view = grid[:, :2]  # a strided view, as the image stamps of a four-stamp batch
    _arcsinh_inplace(view)
    np.testing.assert_allclose(grid[:, :2], np.arcsinh(original[:, :2].astype(float)), atol=4e-7)
    assert np.array_equal(grid[:, 2], original[:, 2])  # the rest of the array untouched


def test_folded_batchnorm_gives_the_same_logits_and_leaves_the_net_alone():
    import torch

    torch.manual_seed(3)
    net = RealBogusNet(ModelConfig(width=4, dense=8))
    for layer in net.modules():  # statistics far from the identity, as after training
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-2, 2)
            layer.running_var.uniform_(0.2, 5)
            layer.weight.data.uniform_(0.5, 2)
            layer.bias.data.uniform_(-1, 1)
    net.train()
    x = torch.from_numpy(np.random.default_rng(8).normal(0, 1, (6, 4, 63, 63)).astype(np.float32))
    folded = fold_batchnorm(net)
    assert net.training  # the original keeps its mode and its layers
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 6
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        expected = net.eval()(x)
        np.testing.assert_allclose(folded(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
        assert np.abs(expected.numpy()).max() > 0.1  # a comparison of real numbers


def test_fused_convolution_and_relu_match_the_two_layers():
    import torch

    torch.manual_seed(4)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).eval()
    x = torch.randn(5, 4, 63, 63).contiguous(memory_format=torch.channels_last)
    fused = ConvReLU(conv)
    with torch.inference_mode():
        expected = torch.relu(conv(x))
        got = fused(x)
        assert torch.equal(got, expected)
        plain = x.contiguous()  # the other layout: another kernel, the same numbers
        torch.testing.assert_close(fused(plain), torch.relu(conv(plain)), rtol=1e-5, atol=1e-6)
        assert (expected == 0).float().mean() > 0.3 and expected.max() > 0.5
    if torch.backends.mkldnn.is_available():  # the fused operator is what ran
        assert _conv_relu_op() is not None
    y = fused(x[:2])  # with gradients: the two layers, so training could use it
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    net = fold_batchnorm(RealBogusNet(ModelConfig(width=4, dense=8)))
    assert sum(isinstance(m, ConvReLU) for m in net.modules()) == 6
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.features.modules())


def test_normalisation_in_pieces_matches_one_candidate_at_a_time(monkeypatch):
    """Candidates are normalised a few at a time; none depends on its neighbours."""
    from pipeline.ml import model

    rng = np.random.default_rng(12)
    stamps = rng.normal(100, 7, (11, 4, 63, 63)).astype(np.float32)
    stamps[:, 3] = 0
    stamps[2, 2, 29:34, 29:34] -= 300  # a fading source: swapped by orient
    stamps[4, 0, :20] = 0  # masked
    stamps[4, 3, :20] = 1
    stamps[6, 1, 5:9, 40] = np.nan
    stamps[8, 2] = 0  # all masked: spread fallback
    alone = np.concatenate([normalise_triplets(s[None], orient=True) for s in stamps])
    monkeypatch.setattr(model, "_NORMALISE_CHUNK", 3 * stamps[0].size)  # pieces of three
    pieces = normalise_triplets(stamps, orient=True)
    assert np.array_equal(pieces, alone)
    assert np.array_equal(pieces[2, 0], alone[2, 0]) and pieces[2, 2, 31, 31] > 0
    assert np.all(pieces[8, 2] == 0) and np.all(pieces[4, 3, :20] == MASK_LEVEL)


def test_masked_pixels_do_not_set_the_noise_scale():
    """A stamp half under a saturation mask keeps the noise scale of its other half."""
    rng = np.random.default_rng(5)
    stamps = rng.normal(0, 5, (2, 3, 63, 63)).astype(np.float32)
    stamps[1, :, :, :35] = 0.0  # masked (0 in the preprocessed images)
    out = normalise_triplets(stamps)
    significance = 3 * np.sinh(out)
    assert np.std(significance[0]) == pytest.approx(1.0, rel=0.06)
    for channel in range(3):
        # counting the zeros read 1.5σ here (the spread fallback), 10σ at 48% masked
        assert np.std(significance[1, channel, :, 35:]) == pytest.approx(1.0, rel=0.08)
    assert np.all(out[1, :, :, :35] == 0)


def test_orientation_shows_a_faded_source_as_a_new_one():
    """With ``orient``, (sci, ref, −diff) of a vanished source reads as a brightening."""
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:63, :63]
    star = 400.0 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / (2 * 2.0**2))
    noise = rng.normal(0, 5, (3, 63, 63))
    new = np.stack([noise[0] + star, noise[1], noise[2] + star]).astype(np.float32)
    faded = np.stack([noise[1], noise[0] + star, -(noise[2] + star)]).astype(np.float32)
    both = np.stack([new, faded])
    plain, oriented = normalise_triplets(both), normalise_triplets(both, orient=True)
    np.testing.assert_array_equal(oriented[0], plain[0])  # a brightening is left alone
    np.testing.assert_allclose(oriented[1], plain[0], atol=1e-6)  # the faded one turned
    assert oriented[1, 2, 31, 31] > 2 and plain[1, 2, 31, 31] < -2
    # a mask stamp stays in place (it belongs to the pair, not to an epoch) as 0 / MASK_LEVEL
    mask = np.zeros((2, 1, 63, 63), dtype=np.float32)
    mask[:, 0, 31, 20:25] = 1.0
    with_mask = normalise_triplets(np.concatenate([both, mask], axis=1), orient=True)
    np.testing.assert_allclose(with_mask[:, :3], oriented, atol=1e-6)
    assert set(np.unique(with_mask[:, 3])) == {0.0, MASK_LEVEL}
    assert (with_mask[:, 3, 31, 20:25] == MASK_LEVEL).all() and with_mask[
        :, 3
    ].sum() == 10 * MASK_LEVEL


def test_a_model_reads_the_mask_stamp_only_when_it_was_trained_with_it():
    from pipeline.ml.train import predict_logits

    stamps = np.random.default_rng(5).normal(0, 3, (6, 4, 63, 63)).astype(np.float32)
    stamps[:, 3] = 0.0
    stamps[:3, 3, 25:38, 30:33] = 1.0  # a repaired column through three of them
    without = RealBogusNet(ModelConfig(width=4, dense=8, mask=False)).eval()
    np.testing.assert_array_equal(
        predict_logits(without, stamps), predict_logits(without, stamps[:, :3])
    )
    reads = RealBogusNet(ModelConfig(width=4, dense=8)).eval()
    cleaned = stamps.copy()
    cleaned[:, 3] = 0.0
    changed = predict_logits(reads, stamps) != predict_logits(reads, cleaned)
    assert changed.tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match=r"reads 4 stamps .* have 3: cut them with"):
        predict_logits(reads, stamps[:, :3])


def test_network_shape_and_size():
    import torch

    net = RealBogusNet(ModelConfig(width=16, dense=64)).eval()
    assert net.config.channels == 4  # science, reference, difference, mask
    assert net(torch.zeros(5, 4, 63, 63)).shape == (5,)
    assert 50_000 < sum(p.numel() for p in net.parameters()) < 400_000  # braai-sized
    assert RealBogusNet(ModelConfig(mask=False)).eval()(torch.zeros(2, 3, 63, 63)).shape == (2,)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=0.95)


@pytest.fixture(scope="module")
def night(candidate_night):
    # 8 simulated 512² pairs through our own pipeline; whole images per split
    return candidate_night(8, (0.6, 0.2, 0.2))


def test_training_learns_calibrates_and_round_trips(night, tmp_path):
    config = TrainConfig(epochs=12, patience=4, batch_size=32, model=ModelConfig(width=8, dense=32))
    seen = []
    model = train_model(night, config, on_epoch=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [h["epoch"] for h in model.history]
    losses = [h["val_loss"] for h in model.history]
    assert min(losses) < 0.7 * losses[0]  # it learned something on images it never saw
    # the kept epoch ranks the validation images best (AUCs within min_delta: the lower loss)
    best = (-np.inf, np.inf)
    for h in model.history:
        if _better((h["val_auc"], h["val_loss"]), best, config.min_delta):
            best, kept = (h["val_auc"], h["val_loss"]), h["epoch"]
    assert model.best_epoch == kept

    test = night.subset("test")
    p = model.predict_proba(test.triplets)
    assert roc_auc(p, test.label) > 0.8  # held-out image (0.90 measured)
    val = night.subset("validation")
    calibrated = binary_nll(model.predict_proba(val.triplets), val.label)
    model_t1 = type(model)(**{**model.__dict__, "temperature": 1.0})
    assert calibrated <= binary_nll(model_t1.predict_proba(val.triplets), val.label) + 1e-9

    path = model.save(tmp_path / "m" / "model.pt")
    loaded = load_model(path)
    np.testing.assert_allclose(loaded.predict_proba(test.triplets), p, rtol=1e-5, atol=1e-6)
    assert loaded.dataset_id == night.dataset_id and loaded.config == config

    again = train_model(night, config)  # same seed, same data: the same run
    assert [h["val_loss"] for h in again.history] == pytest.approx(losses, rel=1e-4)


def test_an_epoch_is_better_by_a_clear_auc_gain_or_a_lower_loss_at_a_like_auc():
    best = (0.9997, 0.0249)
    assert _better((0.9999, 0.0300), (0.9990, 0.02), 5e-4)  # a clear AUC gain
    assert not _better((0.9996, 0.0257), best, 5e-4)  # AUC noise, higher loss
    assert _better((0.9994, 0.0201), best, 5e-4)  # AUC noise, lower loss
    assert not _better((0.9990, 0.0100), best, 5e-4)  # a clear AUC loss
    assert not _better((0.9994, 0.0201), best, 0.0)  # without tolerance: AUC first
    assert _better((0.9997, 0.0201), best, 0.0)  # ... and ties to the lower loss
    with pytest.raises(ValueError, match="min_delta"):
        TrainConfig(min_delta=-0.1)


def test_bad_settings_and_single_class_splits_are_refused(night):
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 0.1})
    assert TrainConfig.from_dict({"epochs": 3, "width": 4}).model.width == 4
    only_bogus = type(night)(**{**night.__dict__, "label": np.zeros_like(night.label)})
    with pytest.raises(ValueError, match="needs real and bogus"):
        train_model(only_bogus, TrainConfig(epochs=1))


def test_normalisation_is_significance_and_keeps_bright_peaks_apart():
    rng = np.random.default_rng(3)
    stamps = rng.normal(200, 7, (3, 3, 63, 63)).astype(np.float32)
    stamps[1, 2, 31, 31] = 200 + 20 * 7  # a 20σ pixel
    stamps[2, 2, 31, 31] = 200 + 2000 * 7  # a 2000σ pixel
    out = normalise_triplets(stamps)
    significance = 3 * np.sinh(out)  # undo the asinh: (x - median) / σ
    assert np.std(significance[0]) == pytest.approx(1.0, rel=0.05)
    assert significance[1, 2, 31, 31] == pytest.approx(20, rel=0.08)  # σ from the stamp
    assert significance[2, 2, 31, 31] == pytest.approx(1000, rel=1e-3)  # clipped at 1000σ
    assert out[2, 2, 31, 31] > out[1, 2, 31, 31] + 3


def test_batched_prediction_matches_one_pass():
    import torch

    from pipeline.ml.train import _logits, predict_logits

    torch.manual_seed(0)
    net = RealBogusNet(ModelConfig(width=4, dense=8)).eval()
    stamps = np.random.default_rng(4).normal(0, 3, (10, 4, 63, 63)).astype(np.float32)
    stamps[:, 3] = stamps[:, 3] > 2  # a mask stamp
    assert net.config.orient  # the default: fading candidates are turned
    whole = _logits(net, normalise_triplets(stamps, orient=True), batch_size=64)
    np.testing.assert_allclose(predict_logits(net, stamps, batch_size=3), whole, atol=1e-5)
    threads = torch.get_num_threads()
    try:  # batches shared among worker threads, in order, whatever their number
        for n in (1, 3):
            torch.set_num_threads(n)
            got = predict_logits(net, stamps)
            assert torch.get_num_threads() == n  # the caller's setting restored
            np.testing.assert_allclose(got, whole, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert predict_logits(net, stamps[:1]).shape == (1,)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # callers in several threads take turns
        for got in pool.map(lambda _: predict_logits(net, stamps), range(8)):
            np.testing.assert_allclose(got, whole, atol=1e-5)
    assert torch.get_num_threads() == threads


def test_position_aware_head_and_models_saved_before_it(tmp_path):
    import torch

    flat = RealBogusNet(ModelConfig(width=4, dense=8)).eval()
    # the flatten head's dense layer reads every cell of the 7×7 map (where a feature
    # lies: the candidate is at the centre); the pooled one only the channel means
    assert flat.head[2].in_features == 4 * 4 * 7 * 7
    pooled = RealBogusNet(ModelConfig(width=4, dense=8, head="pool")).eval()
    assert pooled.head[2].in_features == 4 * 4
    centre = torch.zeros(1, 4, 63, 63)
    centre[..., 29:34, 29:34] = 3.0
    rolled = torch.roll(centre, (8, 8), dims=(2, 3))  # whole 8-px moves keep pooled maps
    with torch.no_grad():
        assert float(pooled(centre)) == pytest.approx(float(pooled(rolled)), abs=1e-4)
    with pytest.raises(ValueError, match="head"):
        ModelConfig(head="attention")

    before = RealBogusNet(ModelConfig(width=4, dense=8, head="pool", mask=False))
    old = {
        "state_dict": before.state_dict(),
        "temperature": 1.5,
        "config": {"epochs": 3, "width": 4, "dense": 8, "dropout": 0.3},  # no "head" key
        "history": [],
        "best_epoch": 1,
        "dataset_id": "old",
    }
    torch.save(old, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.config.model.head == "pool" and loaded.temperature == 1.5
    assert loaded.config.model.orient is False  # saved before orientation: not oriented
    assert loaded.config.model.mask is False  # ... and before the mask stamp: three read


@pytest.mark.parametrize("channels", [6, 8])
def test_batchnorm_in_channels_last_matches_torchs_in_values_gradients_and_state(channels):
    import torch

    torch.manual_seed(0)
    x = (3.0 * torch.randn(16, channels, 21, 21) + 1.5).contiguous(
        memory_format=torch.channels_last
    )
    ours, theirs = BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    outputs, grads = [], []
    for bn in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        out = bn(xi)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        outputs.append(out.detach())
        grads.append((xi.grad, bn.weight.grad, bn.bias.grad))
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the running statistics are updated alike (and the mean is not the initial 0)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.running_mean.abs().min() > 0.1
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_training_on_inputs_made_once_is_the_same_run(night):
    config = TrainConfig(epochs=2, batch_size=64, model=ModelConfig(width=6, dense=16))
    inputs = training_inputs(night, config.model)
    assert inputs.x_train.shape[1:] == (config.model.channels, 63, 63)
    held = inputs.x_train.copy()
    made_here = train_model(night, config)
    given = train_model(night, config, inputs=inputs)
    # the same run (to the tolerance of two identical runs, as above)
    losses = [h["val_loss"] for h in made_here.history]
    assert [h["val_loss"] for h in given.history] == pytest.approx(losses, rel=1e-4)
    assert given.temperature == pytest.approx(made_here.temperature, rel=1e-4)
    np.testing.assert_array_equal(inputs.x_train, held)  # training left them as they were
    other = TrainConfig(epochs=1, model=ModelConfig(width=6, dense=16, orient=False))
    with pytest.raises(ValueError, match=r"made from dataset .* \(orient=True\).*orient=False"):
        train_model(night, other, inputs=inputs)
