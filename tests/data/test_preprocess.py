"""Resampling: low-pass before downsampling, labels untouched by smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fedct.data.preprocess import (
    PrepSpec,
    antialias_sigma_mm,
    lowpass,
    normalise,
    resample,
    to_array,
)

IN_MM, OUT_MM = 1.0, 4.0
N_IN, N_OUT = 128, 32  # both 128 mm: the output grid covers the input exactly


def _image(values: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    """(X, Y, Z) array -> SimpleITK image (which indexes (z, y, x))."""
    img = sitk.GetImageFromArray(np.transpose(values, (2, 1, 0)).astype(np.float32))
    img.SetSpacing(spacing)
    return img


def _spec(size: tuple[int, int, int] = (N_OUT, N_OUT, N_OUT)) -> PrepSpec:
    return PrepSpec((OUT_MM,) * 3, size, -1000.0, 1000.0)


def _wave(period_mm: float, axis: int) -> np.ndarray:
    """A unit cosine along ``axis`` of a 128 mm cube sampled at 1 mm."""
    x = (np.arange(N_IN) + 0.5) * IN_MM
    shape = [1, 1, 1]
    shape[axis] = N_IN
    return np.broadcast_to(np.cos(2 * np.pi * x / period_mm).reshape(shape), (N_IN,) * 3)


def _amplitude(out: np.ndarray, period_mm: float, axis: int) -> float:
    """Amplitude of the cosine of ``period_mm`` along ``axis`` in a resampled volume."""
    line = np.moveaxis(out, axis, 0)[:, N_OUT // 2, N_OUT // 2]
    x = (np.arange(N_OUT) + 0.5) * OUT_MM
    basis = np.exp(-2j * np.pi * x / period_mm)
    return float(2 * abs((line * basis).mean()))


def test_sigma_rule() -> None:
    # Total FWHM = output spacing: sqrt(7^2 - 0.8^2) / 2.355; nothing where not downsampled.
    sigma = antialias_sigma_mm(np.array([0.8, 7.0, 9.0]), np.array([7.0, 7.0, 7.0]))
    assert sigma[0] == pytest.approx(np.sqrt(49 - 0.64) / 2.3548, rel=1e-3)
    assert sigma[1] == 0.0 and sigma[2] == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_pattern_above_nyquist_is_removed_and_low_frequency_passes(axis: int) -> None:
    # Output Nyquist: period 8 mm. A 3.5 mm period folds to a 28 mm alias on the 4 mm grid
    # when sampled without a low-pass: a slow wave the network would take for anatomy.
    fine = _image(_wave(3.5, axis), (IN_MM,) * 3)
    out = to_array(resample(fine, _spec()))[0]
    alias_period = 1 / (1 / 3.5 - 1 / OUT_MM)
    assert _amplitude(out, alias_period, axis) < 0.03
    naive = to_array(sitk.Resample(fine, resample(fine, _spec()), sitk.Transform(),
                                   sitk.sitkLinear))[0]
    assert _amplitude(naive, alias_period, axis) > 0.5  # what the low-pass prevents
    # A 32 mm period (4 output voxels per half-cycle) passes nearly unchanged.
    slow = to_array(resample(_image(_wave(32.0, axis), (IN_MM,) * 3), _spec()))[0]
    assert _amplitude(slow, 32.0, axis) > 0.85


def test_white_noise_is_attenuated_to_what_the_grid_can_hold() -> None:
    noise = np.random.default_rng(0).normal(0, 100, (N_IN,) * 3)
    out = to_array(resample(_image(noise, (IN_MM,) * 3), _spec()))[0]
    inner = out[2:-2, 2:-2, 2:-2]
    # Unfiltered 4x decimation keeps the input's sigma (100 HU); averaging over the ~4^3
    # voxels of one output voxel leaves about 100 / sqrt(64) ~ 12 HU.
    assert inner.std() < 20
    assert abs(inner.mean()) < 5


def test_no_smoothing_along_axes_that_are_not_downsampled() -> None:
    # 4 mm in-plane input on a 4 mm grid: an in-plane edge stays a step; z is downsampled.
    values = np.zeros((N_OUT, N_OUT, N_IN), np.float32)
    values[N_OUT // 2:] = 500.0
    out = to_array(resample(_image(values, (OUT_MM, OUT_MM, IN_MM)), _spec()))[0]
    np.testing.assert_allclose(out[N_OUT // 2 - 1], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[N_OUT // 2], 500.0, atol=1e-3)


def test_lowpass_keeps_a_constant_volume_to_its_borders() -> None:
    img = _image(np.full((20, 20, 20), 40.0), (1.0, 1.0, 1.0))
    out = sitk.GetArrayFromImage(lowpass(img, np.array([3.0, 0.0, 1.5])))
    np.testing.assert_allclose(out, 40.0, rtol=1e-4)


def test_labels_stay_nearest_neighbour() -> None:
    lab = np.zeros((N_IN,) * 3, np.uint8)
    lab[40:90, 30:100, 20:60] = 3
    lab[::2] = np.where(lab[::2] == 3, 5, 0)  # a high-frequency label pattern
    img = sitk.GetImageFromArray(np.transpose(lab, (2, 1, 0)))
    img.SetSpacing((IN_MM,) * 3)
    out = to_array(resample(img, _spec(), label=True))[0]
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 3, 5}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_hu_window_equals_monais_scale_intensity_range(dtype: type) -> None:
    from monai.transforms import ScaleIntensityRange

    spec = PrepSpec((OUT_MM,) * 3, (N_OUT,) * 3, -250.0, 1000.0)
    hu = np.random.default_rng(0).normal(0.0, 800.0, (1, 40, 30, 20)).astype(dtype)
    # The window's edges, values just inside and outside them, signed zeros.
    hu.flat[:10] = [-250.0, 1000.0, -1024.0, 3071.0, 0.0, -0.0, -249.99, 999.99, 1e-3, 5]
    theirs = ScaleIntensityRange(a_min=spec.hu_min, a_max=spec.hu_max, b_min=0.0, b_max=1.0,
                                 clip=True)(hu)
    ours = normalise(hu, spec)
    assert ours.dtype == np.float32 and ours.shape == hu.shape
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float32))
    assert ours.min() == 0.0 and ours.max() == 1.0
