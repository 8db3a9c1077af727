"""The gap rule of benchmarks/estimator.py: (loc, scale, clip) for the control-variate estimator
read off a measured MSE curve, on synthetic gaps with closed-form quantiles."""
import math

import numpy as np
import pytest

from benchmarks.estimator import gap_logsnr_params


def test_gap_logsnr_params_on_a_synthetic_gap():
    # gap = mmse_ref - mse shaped as a logistic density with (loc, scale): its median is loc,
    # its quartiles loc -+ scale ln 3 and its [1e-3, 1 - 1e-3] quantiles loc -+ scale logit(1 - 1e-3)
    loc, scale, d = -1.2, 1.8, 3
    a = np.linspace(-40, 40, 8001)
    v = (a - loc) / scale
    density = 1 / (np.exp(v / 2) + np.exp(-v / 2)) ** 2
    mmse_ref = d / (1 + np.exp(-a))
    got = gap_logsnr_params(a, mmse_ref - 0.7 * density, mmse_ref, tail=1e-3)
    assert got[0] == pytest.approx(loc, abs=0.02)
    assert got[1] == pytest.approx(scale, abs=0.02)
    assert got[2] == pytest.approx(math.log(999), abs=0.02)
    # a gap of either sign counts; a short tail gives the minimum clip
    got = gap_logsnr_params(a, mmse_ref + 0.7 * density, mmse_ref, tail=0.05)
    assert got[0] == pytest.approx(loc, abs=0.02) and got[2] == 4.0
    with pytest.raises(ValueError, match="no gap"):
        gap_logsnr_params(a, mmse_ref, mmse_ref)


def test_gap_logsnr_params_asymmetric_gap():
    # a gap with a heavy upper tail (two logistic bumps): the quantiles of its closed-form CDF
    # F(a) = 0.8 s((a - 0)/1) + 0.2 s((a - 6)/2), found by root finding, give the expected
    # loc = median, scale = IQR / (2 ln 3) and clip = the larger of the two tail distances / scale
    import scipy.optimize
    from scipy.special import expit

    def cdf(v):
        return 0.8 * expit(v) + 0.2 * expit((v - 6) / 2)

    def quantile(q):
        return scipy.optimize.brentq(lambda v: cdf(v) - q, -60, 80, xtol=1e-12)

    a = np.linspace(-40, 60, 20001)
    density = 0.8 * expit(a) * expit(-a) + 0.2 / 2 * expit((a - 6) / 2) * expit(-(a - 6) / 2)
    mmse_ref = 2 / (1 + np.exp(-a))
    loc, scale, clip = gap_logsnr_params(a, mmse_ref - density, mmse_ref, tail=1e-3)
    exp_loc, exp_scale = quantile(0.5), (quantile(0.75) - quantile(0.25)) / (2 * math.log(3))
    assert loc == pytest.approx(exp_loc, abs=0.01)
    assert scale == pytest.approx(exp_scale, abs=0.01)
    upper, lower = (quantile(1 - 1e-3) - exp_loc) / exp_scale, (exp_loc - quantile(1e-3)) / exp_scale
    assert upper > lower + 1
    assert clip == pytest.approx(upper, abs=0.02)
