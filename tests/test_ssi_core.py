"""Unit tests of the SSI building blocks: masking, forward operator, receptive field, sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from ssi_dask.ssi import (
    PatchSampler,
    PSFOperator,
    UNet,
    mask_input,
    receptive_field_radius,
    rho_schedule,
    validation_mask,
)
from ssi_dask.ssi.symmetry import apply, invert, psf_symmetries


def test_bernoulli_mask_density():
    from ssi_dask.ssi import bernoulli_mask

    g = torch.Generator().manual_seed(0)
    m = bernoulli_mask((4, 1, 128, 128), 0.1, g)
    assert m.dtype == torch.bool
    assert abs(m.float().mean().item() - 0.1) < 0.005


def test_rho_schedule_decays_to_target():
    vals = [rho_schedule(s, 1000, 0.5, 0.05, 0.3) for s in range(1000)]
    assert vals[0] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert vals[300] == pytest.approx(0.05, abs=0.01 * 0.45 + 1e-9)
    assert vals[-1] == pytest.approx(0.05, abs=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_masked_input_holds_no_information_about_masked_pixels(ndim):
    rng = np.random.default_rng(0)
    shape = (2, 1) + (12,) * ndim
    x = torch.from_numpy(rng.random(shape, dtype=np.float32))
    m = torch.from_numpy(rng.random(shape) < 0.3)
    a = mask_input(x, m)
    x2 = torch.where(m, torch.from_numpy(rng.random(shape, dtype=np.float32)) * 100, x)
    b = mask_input(x2, m)
    assert torch.equal(a, b)  # changing masked values changes nothing
    assert torch.equal(a[~m], x[~m])  # visible pixels untouched


def test_network_output_at_masked_pixel_does_not_depend_on_its_value():
    torch.manual_seed(0)
    net = UNet(2, levels=2, base_channels=4).eval()
    x = torch.rand(1, 1, 32, 32, requires_grad=True)
    m = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    m[0, 0, 10, 13] = True
    m[0, 0, 11, 13] = True  # a masked neighbour must not leak it either
    out = net(mask_input(x, m))
    (g,) = torch.autograd.grad(out.sum(), x)  # every output, incl. through the forward model
    assert g[0, 0, 10, 13] == 0 and g[0, 0, 11, 13] == 0
    assert g[0, 0, 12, 13] != 0


def test_validation_mask_is_a_function_of_global_coordinates():
    full = validation_mask((0, 0), (64, 80), 0.1, seed=3)
    assert abs(full.mean() - 0.1) < 0.02
    part = validation_mask((17, 30), (20, 25), 0.1, seed=3)
    np.testing.assert_array_equal(part, full[17:37, 30:55])
    assert not np.array_equal(full, validation_mask((0, 0), (64, 80), 0.1, seed=4))


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_operator_matches_scipy(ndim):
    rng = np.random.default_rng(1)
    psf = rng.random((5, 7, 3)[:ndim]).astype(np.float32)
    psf /= psf.sum()
    # prime sides (23, 19, 17; 19 + 6 after padding for same()): the FFTs run zero-extended
    # to the next 2^a 3^b 5^c size, which must not change the valid part
    x = rng.random((23, 19, 17)[:ndim]).astype(np.float32)
    op = PSFOperator(psf)
    got = op.valid(torch.from_numpy(x)[None, None])[0, 0].numpy()
    ref = fftconvolve(x.astype(np.float64), psf, mode="valid")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # full(): the whole linear convolution (P + K - 1 per axis; 23 + 5 - 1 = 27 runs at 27,
    # 19 + 7 - 1 = 25 at 25, 17 + 3 - 1 = 19 zero-extended to 20)
    got_full = op.full(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got_full, fftconvolve(x.astype(np.float64), psf), atol=1e-5)
    # crop() selects the input pixels aligned with valid() outputs
    assert op.crop(torch.from_numpy(x)).shape == got.shape
    got_same = op.same(torch.from_numpy(x)[None, None], mode="reflect")[0, 0].numpy()
    r = [k // 2 for k in psf.shape]
    ref_same = fftconvolve(np.pad(x, [(k, k) for k in r], mode="reflect"), psf, mode="valid")
    np.testing.assert_allclose(got_same, ref_same, atol=1e-5)
    flipped = psf[tuple(slice(None, None, -1) for _ in range(ndim))]
    ref_t = fftconvolve(np.pad(x, [(k, k) for k in r], mode="reflect"), flipped, mode="valid")
    for _ in range(2):  # the flipped operator is kept and reused
        got_t = op.same_transpose(torch.from_numpy(x)[None, None], mode="reflect")[0, 0].numpy()
        np.testing.assert_allclose(got_t, ref_t, atol=1e-5)


def _gradient_radius(net, ndim, size, position):
    x = torch.ones((1, 1) + (size,) * ndim, requires_grad=True)
    out = net(x)
    (g,) = torch.autograd.grad(out[(0, 0) + position], x)
    nz = np.argwhere(g[0, 0].numpy() != 0)
    return int(np.abs(nz - np.array(position)).max())


@pytest.mark.parametrize("ndim,levels", [(2, 1), (2, 2), (2, 3), (2, 4), (3, 2)])
def test_receptive_field_radius_is_exact(ndim, levels):
    torch.manual_seed(0)
    net = UNet(ndim, levels=levels, base_channels=2, batch_norm=False)
    with torch.no_grad():  # positive weights: every path is active, no cancellation
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    r = receptive_field_radius(net)
    size = 2 * r + 2 * net.alignment + 8
    size += (-size) % net.alignment
    centre = size // 2 - size // 2 % net.alignment
    measured = max(
        _gradient_radius(net, ndim, size, (centre + k,) * ndim) for k in range(net.alignment)
    )
    assert measured == r
    assert net.halo >= r and net.halo % net.alignment == 0


def test_receptive_field_default_model_is_small():
    net = UNet(2, levels=3, base_channels=8)
    assert receptive_field_radius(net) == 23
    assert net.halo == 24


class RecordingArray:
    """Array-like that records the regions read."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]


def test_sampler_reads_only_requested_patches():
    arr = RecordingArray(np.arange(200 * 300, dtype=np.float32).reshape(200, 300))
    s = PatchSampler(arr, (32, 48), seed=0)
    patches, origins = s.batch(5)
    assert patches.shape == (5, 32, 48)
    assert len(arr.reads) == 5
    for key, o, p in zip(arr.reads, origins, patches):
        assert all(isinstance(k, slice) for k in key)
        assert [k.stop - k.start for k in key] == [32, 48]
        np.testing.assert_array_equal(p, arr.data[o[0] : o[0] + 32, o[1] : o[1] + 48])


def test_sampler_on_zarr_and_dask():
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    data = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    z = zarr.zeros((64, 64, 64), chunks=(16, 16, 16), dtype="f4")
    z[...] = data
    for src in (z, da.from_array(data, chunks=16)):
        p, o = PatchSampler(src, (20, 20, 20), seed=1).batch(2)
        np.testing.assert_array_equal(p[0], data[tuple(slice(a, a + 20) for a in o[0])])


def test_psf_symmetries_and_transforms():
    psf = np.zeros((5, 5), np.float32)
    psf[2, 1:4] = 1  # horizontal bar: both flips, no swap
    syms = psf_symmetries(psf)
    assert ((), False) in syms and ((-1,), False) in syms and ((), True) not in syms
    x = torch.rand(1, 1, 6, 6)
    for t in psf_symmetries(np.ones((3, 3))):
        assert torch.equal(invert(apply(x, t), t), x)
