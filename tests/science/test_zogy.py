"""ZOGY on analytic inputs: zero difference, recovered flux, unit-variance S_corr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from pipeline.errors import ScienceError
from pipeline.science.zogy import detection_efficiency, psf_to_otf_shape, torch_available, zogy


def gaussian(size: int, fwhm: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    sigma = fwhm / 2.3548
    y, x = np.mgrid[-(size // 2) : size // 2 + 1, -(size // 2) : size // 2 + 1]
    g = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma**2))
    return g / g.sum()


def add_point(image: np.ndarray, psf: np.ndarray, x: int, y: int, flux: float) -> None:
    h = psf.shape[0] // 2
    image[y - h : y + h + 1, x - h : x + h + 1] += flux * psf


PN, PR = gaussian(31, 4.0), gaussian(31, 2.8)


def test_otf_embedding_puts_the_centre_at_the_origin() -> None:
    wrapped = psf_to_otf_shape(PN, (64, 80))
    assert wrapped[0, 0] == pytest.approx(PN[15, 15])
    assert wrapped[-1, 0] == pytest.approx(PN[14, 15])
    assert wrapped.sum() == pytest.approx(1.0, rel=1e-6)


def test_identical_images_give_zero_difference() -> None:
    rng = np.random.default_rng(0)
    sky = np.zeros((128, 128))
    for _ in range(30):
        sky[rng.integers(20, 108), rng.integers(20, 108)] += rng.uniform(100, 1e4)
    ref = fftconvolve(sky, PR, mode="same").astype(np.float32)
    # the new image: another PSF and half the throughput, same scene
    new = (0.5 * fftconvolve(sky, PN, mode="same")).astype(np.float32)
    result = zogy(new, ref, PN, PR, sigma_new=3.0, sigma_ref=2.0, flux_new=0.5)
    scale = np.abs(new).max()
    assert np.abs(result.D).max() < 1e-4 * scale
    assert np.abs(result.alpha).max() < 1e-3 * 1e4


@pytest.mark.parametrize("flux_new", [1.0, 0.6])
def test_point_source_in_new_is_recovered_at_the_right_flux(flux_new: float) -> None:
    new = np.zeros((160, 160), dtype=np.float32)
    ref = np.zeros_like(new)
    add_point(new, PN, 70, 90, 5000.0 * flux_new)  # 5000 in reference units
    result = zogy(new, ref, PN, PR, sigma_new=5.0, sigma_ref=3.0, flux_new=flux_new)
    assert np.unravel_index(np.argmax(result.S), result.S.shape) == (90, 70)
    assert result.alpha[90, 70] == pytest.approx(5000.0, rel=1e-3)
    # noise of the flux estimate: background of both images through F_S
    assert result.alpha_err[90, 70] == pytest.approx(np.sqrt(1.0 / result.F_S), rel=1e-3)
    assert result.S_corr[90, 70] == pytest.approx(5000.0 * np.sqrt(result.F_S), rel=1e-3)


@pytest.mark.parametrize("flux_new", [1.0, 0.6])
def test_detection_efficiency_is_zogys_score_over_the_science_images_own(flux_new: float):
    # noiseless images: S_corr at the source is its expectation
    new = np.zeros((160, 160), dtype=np.float32)
    add_point(new, PN, 70, 90, 5000.0 * flux_new)
    result = zogy(new, np.zeros_like(new), PN, PR, sigma_new=5.0, sigma_ref=3.0, flux_new=flux_new)
    alone = 5000.0 * flux_new * np.sqrt((PN**2).sum()) / 5.0  # matched filter on new alone
    efficiency = detection_efficiency(PN, PR, 5.0, 3.0, flux_new=flux_new)
    assert efficiency == pytest.approx(result.S_corr[90, 70] / alone, rel=2e-3)
    assert 0.8 < efficiency < 1.0  # a sharper, quieter reference: most of the S/N is kept
    # limits: a noiseless reference keeps all of it, twin images 1/√2
    assert detection_efficiency(PN, PR, 5.0, 0.0) == pytest.approx(1.0, rel=1e-9)
    assert detection_efficiency(PN, 3 * PN, 4.0, 4.0) == pytest.approx(2**-0.5, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_new > 0"):
        detection_efficiency(PN, PR, 0.0, 1.0)


def test_disappearing_source_gives_negative_flux() -> None:
    new = np.zeros((128, 128), dtype=np.float32)
    ref = np.zeros_like(new)
    add_point(ref, PR, 40, 60, 3000.0)
    result = zogy(new, ref, PN, PR, sigma_new=4.0, sigma_ref=4.0)
    assert result.alpha[60, 40] == pytest.approx(-3000.0, rel=1e-3)
    assert result.S_corr[60, 40] < -10


def test_scorr_has_unit_variance_on_pure_noise() -> None:
    rng = np.random.default_rng(42)
    new = rng.normal(0, 12.0, (512, 512)).astype(np.float32)
    ref = rng.normal(0, 4.0, (512, 512)).astype(np.float32)
    result = zogy(new, ref, PN, PR, sigma_new=12.0, sigma_ref=4.0, flux_new=0.9)
    assert 0.97 < result.S_corr.std() < 1.03
    assert abs(result.S_corr.mean()) < 0.05
    assert 0.97 < result.D.std() < 1.03


@pytest.mark.parametrize("form", ["variance maps", "gains"])
def test_source_noise_term_normalises_a_bright_star(form: str) -> None:
    rng = np.random.default_rng(3)
    n, gain, sky_sigma = 256, 1.0, 5.0
    star = np.zeros((n, n))
    add_point(star, PR, 128, 128, 2e5)
    ref_model = star.astype(np.float32)
    new_model = fftconvolve(ref_model, gaussian(31, 2.7), mode="same").astype(np.float32)
    psf_new = fftconvolve(PR, gaussian(31, 2.7), mode="same")
    trials, sky = [], []
    for _ in range(20):
        var_new = sky_sigma**2 + np.clip(new_model, 0, None) / gain
        var_ref = sky_sigma**2 + np.clip(ref_model, 0, None) / gain
        new = (new_model + rng.normal(0, np.sqrt(var_new))).astype(np.float32)
        ref = (ref_model + rng.normal(0, np.sqrt(var_ref))).astype(np.float32)
        # the variance maps given, or the source noise taken from the images themselves
        noise = (
            dict(var_new=var_new, var_ref=var_ref)
            if form == "variance maps"
            else dict(gain_new=gain, gain_ref=gain)
        )
        result = zogy(new, ref, psf_new, PR, sigma_new=sky_sigma, sigma_ref=sky_sigma, **noise)
        trials.append(result.S_corr[118:139, 118:139])
        sky.append(result.S_corr[20:80, 20:80])
    assert 0.85 < np.stack(trials).std() < 1.15  # without the source term it would be several
    assert 0.95 < np.stack(sky).std() < 1.05  # the source term does not narrow empty sky


def test_source_noise_from_the_images_equals_the_variance_map_form() -> None:
    """σ² + N/g through the images' own spectra = the same variance map convolved exactly."""
    rng = np.random.default_rng(4)
    new, ref = np.zeros((200, 230), np.float32), np.zeros((200, 230), np.float32)
    for _ in range(25):  # noiseless stars: N/g >= 0, so the zero clip changes nothing
        x, y, f = rng.integers(20, 210), rng.integers(20, 180), rng.uniform(1e3, 1e5)
        add_point(new, PN, x, y, 0.8 * f)
        add_point(ref, PR, x, y, f)
    add_point(new, PN, 111, 77, 4e4)  # and a transient
    common = dict(sigma_new=10.0, sigma_ref=5.0, flux_new=0.8, astrometric_sigma=(0.2, 0.3))
    # background maps that vary on a scale far above the filters' width
    yy, xx = np.mgrid[:200, :230]
    bkg_new = (100.0 * (1 + 0.2 * xx / 230)).astype(np.float32)
    bkg_ref = (25.0 * (1 + 0.1 * yy / 200)).astype(np.float32)
    exact = zogy(
        new, ref, PN, PR, **common, var_new=bkg_new + new / 2.5, var_ref=bkg_ref + ref / 4.0
    )
    own = zogy(
        new, ref, PN, PR, **common, gain_new=2.5, gain_ref=4.0,
        background_var_new=bkg_new, background_var_ref=bkg_ref,
    )  # fmt: skip
    inner = (slice(40, 160), slice(40, 190))  # away from the maps' wrap-around edges
    np.testing.assert_allclose(own.V_S[inner], exact.V_S[inner], rtol=2e-3)
    np.testing.assert_allclose(own.S_corr[inner], exact.S_corr[inner], rtol=2e-3, atol=1e-3)
    for name in ("D", "S", "alpha"):  # the noise model does not touch the filters
        np.testing.assert_array_equal(getattr(own, name), getattr(exact, name), err_msg=name)
    # the source term is there: without it the transient's S_corr would be larger
    plain = zogy(new, ref, PN, PR, **common)
    assert own.S_corr[77, 111] < 0.5 * plain.S_corr[77, 111]
    # one image's gain alone: the other keeps its background variance only
    half = zogy(new, ref, PN, PR, **common, gain_new=2.5)
    assert plain.V_S[77, 111] < half.V_S[77, 111] < own.V_S[77, 111]


def test_mixed_noise_forms_are_refused() -> None:
    img = np.zeros((64, 64), dtype=np.float32)
    base = dict(sigma_new=1.0, sigma_ref=1.0)
    with pytest.raises(ScienceError, match="not both"):
        zogy(img, img, PN, PR, **base, var_new=img + 1, gain_new=2.0)
    with pytest.raises(ScienceError, match="gain_ref must be a positive"):
        zogy(img, img, PN, PR, **base, gain_ref=0.0)
    with pytest.raises(ScienceError, match="go with gain_new"):
        zogy(img, img, PN, PR, **base, background_var_new=img + 1)
    with pytest.raises(ScienceError, match="background_var_ref must be finite"):
        zogy(img, img, PN, PR, **base, gain_new=1.0, background_var_ref=img - 1)


def test_astrometric_term_absorbs_a_misregistration_dipole() -> None:
    star = np.zeros((128, 128), dtype=np.float32)
    add_point(star, PR, 64, 64, 1e5)
    shifted = np.zeros_like(star)
    h = 15
    shifted[64 - h : 64 + h + 1, 64 - h : 64 + h + 1] += 1e5 * gaussian(31, 2.8, dx=0.1)
    plain = zogy(shifted, star, PR, PR, sigma_new=5.0, sigma_ref=5.0)
    corrected = zogy(
        shifted, star, PR, PR, sigma_new=5.0, sigma_ref=5.0, astrometric_sigma=(0.1, 0.1)
    )
    assert np.abs(plain.S_corr).max() > 10
    assert np.abs(corrected.S_corr).max() < 1.5


def test_bad_inputs_are_refused() -> None:
    img = np.zeros((64, 64), dtype=np.float32)
    with pytest.raises(ScienceError, match="one shape"):
        zogy(img, np.zeros((32, 32)), PN, PR, sigma_new=1, sigma_ref=1)
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ScienceError, match="new has non-finite pixels"):
        zogy(bad, img, PN, PR, sigma_new=1, sigma_ref=1)
    with pytest.raises(ScienceError, match="sigma_ref must be a positive"):
        zogy(img, img, PN, PR, sigma_new=1, sigma_ref=0)
    with pytest.raises(ScienceError, match="odd dimensions"):
        zogy(img, img, np.ones((4, 4)), PR, sigma_new=1, sigma_ref=1)
    with pytest.raises(ScienceError, match="backend must be"):
        zogy(img, img, PN, PR, sigma_new=1, sigma_ref=1, backend="jax")


@pytest.mark.skipif(not torch_available(), reason="needs a CUDA GPU")
def test_torch_backend_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    new = rng.normal(0, 10, (256, 256)).astype(np.float32)
    ref = rng.normal(0, 5, (256, 256)).astype(np.float32)
    add_point(new, PN, 100, 120, 3000.0)
    a = zogy(new, ref, PN, PR, sigma_new=10, sigma_ref=5, var_new=new.clip(0) + 100.0)
    b = zogy(
        new, ref, PN, PR, sigma_new=10, sigma_ref=5, var_new=new.clip(0) + 100.0, backend="torch"
    )
    np.testing.assert_allclose(a.S_corr, b.S_corr, atol=1e-3)
    np.testing.assert_allclose(a.D, b.D, atol=1e-4 * np.abs(a.D).max())
    np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-4 * np.abs(a.alpha).max())


def test_torch_backend_code_matches_numpy_on_every_product(monkeypatch) -> None:
    """The torch backend's code, run on the CPU, gives every product numpy gives.

    Runs without a GPU, so the backend's arithmetic is checked on every machine (an
    in-place product on ``torch.conj``'s view once wrote into P̂ and spoilt D alone).
    """
    from pipeline.science import zogy as module

    rng = np.random.default_rng(8)
    new = rng.normal(0, 10, (128, 144)).astype(np.float32)
    ref = rng.normal(0, 5, (128, 144)).astype(np.float32)
    add_point(new, PN, 60, 70, 3000.0)
    add_point(ref, PR, 30, 40, 5000.0)
    common = dict(
        sigma_new=10.0, sigma_ref=5.0, flux_new=0.8, astrometric_sigma=(0.3, 0.2),
        flux_error_fraction=0.02,
    )  # fmt: skip
    noise_forms = (
        dict(var_new=new.clip(0) + 100.0, var_ref=ref.clip(0) + 25.0),
        dict(gain_new=2.0, gain_ref=3.0, background_var_new=np.full(new.shape, 100.0)),
    )
    for noise in noise_forms:
        a = zogy(new, ref, PN, PR, **common, **noise)
        with monkeypatch.context() as patch:
            patch.setattr(module, "_transforms", lambda backend, workers: module._TorchFFT("cpu"))
            b = zogy(new, ref, PN, PR, **common, **noise, backend="torch")
        for name in ("D", "S", "S_corr", "V_S", "alpha", "alpha_err", "S_N", "S_R", "P_D"):
            x, y = getattr(a, name), getattr(b, name)
            assert np.abs(x - y).max() <= 1e-4 * np.abs(x).max(), name
        assert abs(b.F_S - a.F_S) <= 1e-5 * a.F_S


def test_blocked_cpu_products_do_not_depend_on_the_threads() -> None:
    """Rows are shared out between threads: one thread or all gives the same products."""
    rng = np.random.default_rng(9)
    new = rng.normal(0, 10, (300, 260)).astype(np.float32)
    ref = rng.normal(0, 5, (300, 260)).astype(np.float32)
    add_point(new, PN, 100, 150, 3000.0)
    kwargs = dict(
        sigma_new=10.0, sigma_ref=5.0, var_new=new.clip(0) + 100.0,
        astrometric_sigma=(0.3, 0.2), flux_error_fraction=0.02,
    )  # fmt: skip
    one = zogy(new, ref, PN, PR, **kwargs, fft_workers=1)
    many = zogy(new, ref, PN, PR, **kwargs, fft_workers=4)
    for name in ("D", "S_corr", "V_S", "alpha", "alpha_err"):
        np.testing.assert_allclose(getattr(one, name), getattr(many, name), rtol=1e-5, atol=1e-6)
    # the astrometric term uses ∂S_N/∂y across block edges: compare with the whole image
    gy, gx = np.gradient(one.S_N)
    expected = one.V_S - (0.3**2 * gx * gx + 0.2**2 * gy * gy)
    floor = 0.02**2 * (one.S_N**2 + one.S_R**2)
    plain = zogy(new, ref, PN, PR, sigma_new=10.0, sigma_ref=5.0, var_new=new.clip(0) + 100.0)
    np.testing.assert_allclose(expected - floor, plain.V_S, rtol=1e-4, atol=1e-4 * plain.V_S.max())


def _zogy_in_child() -> float:
    rng = np.random.default_rng(10)
    new = rng.normal(0, 10, (200, 200)).astype(np.float32)
    return float(zogy(new, 0.5 * new, PN, PR, sigma_new=10, sigma_ref=5, fft_workers=2).S.std())


def test_blocked_zogy_runs_in_a_forked_child() -> None:
    """A child forked after the parent used the row threads still gets its own threads."""
    import multiprocessing

    expected = _zogy_in_child()  # the parent's thread pool now exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_zogy_in_child).get(timeout=60) == expected


@pytest.mark.parametrize("shape", [(256, 256), (354, 360), (101, 97)])
def test_compact_kernel_transform_equals_the_full_one(shape) -> None:
    from pipeline.science.zogy import _NumpyFFT, _place_wrapped

    fft = _NumpyFFT()
    rng = np.random.default_rng(1)
    for size, (hy, hx) in (((47, 47), (23, 23)), ((15, 21), (7, 10)), ((9, 9), (0, 0))):
        kernel = rng.normal(size=size).astype(np.float32)
        full = fft.rfft2(_place_wrapped(kernel, shape, hy, hx))
        compact = fft.rfft2_placed(kernel, shape, hy, hx)
        assert compact.dtype == full.dtype
        assert np.abs(compact - full).max() <= 1e-5 * np.abs(full).max()


def test_detection_efficiency_with_correlated_reference_noise() -> None:
    # a reference convolved with an invertible kernel h holds the same information: with
    # its PSF P_r⊗h and its noise correlated as h⋆h, the efficiency must not change
    h = np.array([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])
    blurred = fftconvolve(np.pad(PR, 1), h, mode="same")
    acf = fftconvolve(h, h[::-1, ::-1])  # 5×5, the noise autocorrelation in σ² units
    white = detection_efficiency(PN, PR, 5.0, 3.0)
    assert detection_efficiency(PN, blurred, 5.0, 3.0, correlation_ref=acf) == pytest.approx(
        white, rel=1e-4
    )
    # white noise at the blurred image's per-pixel scatter (what ignoring the correlation
    # gives) overstates the efficiency: the noise on the PSF's scale is higher than that
    pixel_sigma = 3.0 * np.sqrt(acf[2, 2])
    assert detection_efficiency(PN, blurred, 5.0, pixel_sigma) > 1.05 * white
    # a correlation that only scales the variance is a larger sigma
    scaled = np.zeros((3, 3))
    scaled[1, 1] = 2.0
    assert detection_efficiency(PN, PR, 5.0, 3.0, correlation_ref=scaled) == pytest.approx(
        detection_efficiency(PN, PR, 5.0, 3.0 * np.sqrt(2.0)), rel=1e-9
    )
    with pytest.raises(ValueError, match="correlation_ref"):
        detection_efficiency(PN, PR, 5.0, 3.0, correlation_ref=np.ones((2, 2)))
