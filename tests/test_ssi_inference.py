"""SSI inference copy (BatchNorm folded, oneDNN convolutions): equal to the trained network."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from ssi_dask.ssi import EnsembleUNet, SSIModel, UNet, predict, predict_block
from ssi_dask.ssi.inference import inference_network
from ssi_dask.ssi.tiling import predict_chunk

# the module (``ssi_dask.ssi.predict`` is also the name of the function)
predict_module = importlib.import_module("ssi_dask.ssi.predict")


def _randomise_batch_norm(net: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters far from the identity, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(0.3 + 2 * torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
    return net.eval()


def _model(net: nn.Module) -> SSIModel:
    ndim = net.config["ndim"]
    psf = np.ones((3,) * ndim, np.float32) / 3**ndim
    return SSIModel(net, {"offset": 0.1, "scale": 2.0, "output_range": (-50.0, 50.0)}, psf)


def _plain_predict(model, image, **kwargs):
    predict_module.FAST_INFERENCE = False
    try:
        return predict(model, image, **kwargs)
    finally:
        predict_module.FAST_INFERENCE = True


def _assert_close_relative(a, b, rtol=1e-5):
    scale = float(np.abs(b).max())
    assert scale > 0
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


@pytest.mark.parametrize(
    "ndim, shape, members, levels, kernel_size",
    [
        (2, (70, 53), 1, 3, 3),
        (3, (21, 30, 27), 1, 3, 3),
        (3, (13, 18, 20), 2, 3, 3),  # an ensemble
        (2, (41, 38), 1, 2, 5),  # 5-tap kernels: 3 coarse taps per parity
        (3, (9, 10, 11), 1, 1, 3),  # one level: no decoder
    ],
)
def test_fast_inference_equals_the_trained_network(ndim, shape, members, levels, kernel_size):
    torch.manual_seed(ndim + members)
    config = dict(ndim=ndim, levels=levels, base_channels=4, kernel_size=kernel_size)
    net = UNet(**config) if members == 1 else EnsembleUNet(members, **config)
    model = _model(_randomise_batch_norm(net, seed=ndim))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    image = np.random.default_rng(0).random(shape, dtype=np.float32)

    # the network as trained, called directly (no inference code involved), on the largest
    # part of the image that is a multiple of the pooling grid
    aligned = tuple(slice(0, s - s % net.alignment) for s in shape)
    with torch.no_grad():
        x = (torch.from_numpy(image[aligned]) - 0.1) / 2.0
        direct = net(x[None, None])[0, 0].numpy()
    # the inference copy, on the same input
    fast_net = inference_network(net, torch.device("cpu"))
    with torch.no_grad():
        folded = fast_net(x[None, None])[0, 0].numpy()
    _assert_close_relative(folded, direct)
    # the copy has no BatchNorm left; the trained network keeps its own, and its weights
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast_net.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # through predict (padding, test-time transforms, clipping), fast vs plain
    for tta in (1, 2):
        _assert_close_relative(
            predict(model, image, tta=tta), _plain_predict(model, image, tta=tta)
        )


def test_inference_copy_follows_weight_changes():
    torch.manual_seed(3)
    net = _randomise_batch_norm(UNet(3, levels=2, base_channels=4), seed=3)
    model = _model(net)
    image = np.random.default_rng(1).random((12, 16, 16), dtype=np.float32)
    first = predict(model, image, tta=1)
    assert inference_network(net, torch.device("cpu")) is (
        inference_network(net, torch.device("cpu"))
    )  # cached
    with torch.no_grad():  # e.g. an optimiser step or load_state_dict: in place
        net.encoders[0][0].weight.mul_(-1.5)
        net.encoders[0][1].running_var.mul_(3.0)
    second = predict(model, image, tta=1)
    assert np.abs(second - first).max() > 1e-3  # rounding: ~1e-7
    _assert_close_relative(second, _plain_predict(model, image, tta=1))


def test_chunked_fast_inference_equals_whole_plain():
    torch.manual_seed(4)
    net = _randomise_batch_norm(UNet(3, levels=2, base_channels=4), seed=4)
    model = _model(net)
    h = model.halo
    block = np.random.default_rng(2).random((2 * h + 10, 2 * h + 14, 2 * h + 9)).astype("f4")
    predict_module.FAST_INFERENCE = False
    try:
        expected = predict_block(model, block, device="cpu", tta=2)
    finally:
        predict_module.FAST_INFERENCE = True
    tiled = predict_chunk(model, block, device="cpu", tile_shape=(4, 6, 4), tta=2)
    _assert_close_relative(tiled, expected)
