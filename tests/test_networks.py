"""Tests of the PyTorch U-Nets: tile sizes, building blocks against NumPy, module structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.networks import (
    ARCHITECTURES,
    LESION_CONFIG,
    LIVER_CONFIG,
    LesionUNet,
    LiverUNet,
    UNet3D,
    UNetConfig,
    center_crop,
    instance_normalize,
    pointwise_conv,
    upsample_linear,
)


def _forward_shape(module: UNet3D, input_size: tuple[int, int, int]) -> tuple[int, ...]:
    """Run the module on the meta device, which computes shapes without arithmetic."""
    meta = module.to("meta")
    with torch.inference_mode():
        output = meta(torch.empty((1, 1, *input_size), device="meta"))
    return tuple(output.shape)


@pytest.mark.parametrize(
    ("factory", "input_size", "output_size"),
    [
        (LiverUNet, (189, 162, 162), (163, 136, 136)),
        (LesionUNet, (180, 172, 86), (92, 84, 42)),
    ],
)
def test_default_tile_sizes(factory, input_size, output_size):
    module = factory()

    assert module.default_input_size == input_size
    assert module.default_output_size == output_size
    assert module.output_size_for(input_size) == output_size
    assert module.input_size_for(output_size) == input_size
    assert _forward_shape(module, input_size) == (1, 1, *output_size)


@pytest.mark.parametrize(
    ("factory", "input_size"),
    [
        (LiverUNet, (54, 81, 108)),
        (LiverUNet, (270, 243, 189)),
        (LesionUNet, (92, 100, 46)),
        (LesionUNet, (244, 236, 126)),
    ],
)
def test_other_valid_tiles(factory, input_size):
    module = factory()

    output_size = module.output_size_for(input_size)

    assert module.input_size_for(output_size) == input_size
    assert _forward_shape(module, input_size) == (1, 1, *output_size)


def test_small_tile_real_forward():
    torch.manual_seed(0)
    module = LesionUNet().eval()
    input_size = (92, 92, 46)
    expected = module.output_size_for(input_size)

    with torch.inference_mode():
        output = module(torch.randn(1, 1, *input_size))

    assert tuple(output.shape) == (1, 1, *expected)
    assert output.dtype == torch.float32
    assert float(output.min()) >= 0.0
    assert float(output.max()) <= 1.0


@pytest.mark.parametrize("factory", [LiverUNet, LesionUNet])
def test_invalid_tiles_rejected(factory):
    module = factory()
    input_size = module.default_input_size

    with pytest.raises(ValueError, match="not valid along axis 0"):
        module.output_size_for((input_size[0] + 1, input_size[1], input_size[2]))
    with pytest.raises(ValueError, match="not reachable along axis 2"):
        module.input_size_for((module.default_output_size[0], module.default_output_size[1], 3))
    with pytest.raises(ValueError, match="not valid"):
        module(torch.empty((1, 1, input_size[0], input_size[1] + 1, input_size[2]), device="meta"))


def test_wrong_channel_count_rejected():
    module = LiverUNet().to("meta")

    with pytest.raises(ValueError, match=r"\(N, 1, X, Y, Z\)"):
        module(torch.empty((1, 2, 54, 54, 54), device="meta"))


def test_instance_normalize_matches_numpy():
    generator = np.random.default_rng(7)
    # A large offset relative to the spread makes float32 accumulation visibly wrong.
    values = generator.normal(loc=300.0, scale=2.0, size=(2, 3, 21, 17, 13)).astype(np.float32)
    values[1, 2] = 5.0  # a constant channel: std 0, so the result is 0 / epsilon = 0

    data = values.astype(np.float64)
    mean = data.mean(axis=(2, 3, 4), keepdims=True)
    std = data.std(axis=(2, 3, 4), keepdims=True)
    expected = (data - mean) / (std + 1e-7)

    result = instance_normalize(torch.from_numpy(values)).numpy()

    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5)
    assert np.all(result[1, 2] == 0.0)


def test_instance_normalize_large_channel():
    # More voxels than one summation block, with a tail that is not a whole block.
    generator = np.random.default_rng(3)
    values = generator.normal(loc=-50.0, scale=0.5, size=(1, 2, 61, 59, 37)).astype(np.float32)
    data = values.astype(np.float64)
    expected = (data - data.mean(axis=(2, 3, 4), keepdims=True)) / (
        data.std(axis=(2, 3, 4), keepdims=True) + 1e-7
    )

    result = instance_normalize(torch.from_numpy(values)).numpy()

    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5)


def _keras_linear_upsampling(values: np.ndarray, factor: int) -> np.ndarray:
    """Repeat each voxel ``factor`` times per axis, then average over a factor^3 window."""
    repeated = values
    for axis in (2, 3, 4):
        repeated = np.repeat(repeated, factor, axis=axis)
    size = [n - factor + 1 for n in repeated.shape[2:]]
    out = np.zeros(values.shape[:2] + tuple(size))
    for i in range(factor):
        for j in range(factor):
            for k in range(factor):
                out += repeated[:, :, i : i + size[0], j : j + size[1], k : k + size[2]]
    return out / factor**3


@pytest.mark.parametrize("factor", [2, 3])
def test_upsample_linear_matches_keras_definition(factor):
    generator = np.random.default_rng(factor)
    values = generator.normal(size=(1, 2, 4, 5, 3)).astype(np.float32)

    expected = _keras_linear_upsampling(values.astype(np.float64), factor)
    result = upsample_linear(torch.from_numpy(values), (factor,) * 3)

    assert tuple(result.shape) == expected.shape
    assert tuple(result.shape[2:]) == tuple(factor * (n - 1) + 1 for n in values.shape[2:])
    assert result.is_contiguous()
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-6)


def test_upsample_linear_hand_computed():
    line = torch.tensor([0.0, 3.0, 9.0]).view(1, 1, 3, 1, 1)

    result = upsample_linear(line, (3, 1, 1)).flatten().tolist()

    assert result == pytest.approx([0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 9.0])


def test_pointwise_conv_matches_conv3d():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(6, 4, kernel_size=1)
    x = torch.randn(2, 6, 5, 7, 3)

    with torch.no_grad():
        expected = conv(x)
        result = pointwise_conv(conv, x)

    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_center_crop():
    x = torch.arange(10.0).view(1, 1, 10, 1, 1)

    assert center_crop(x, (6, 1, 1)).flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="spatial axis 0"):
        center_crop(x, (7, 1, 1))
    with pytest.raises(ValueError, match="spatial axis 0"):
        center_crop(x, (11, 1, 1))


@pytest.mark.parametrize(
    ("factory", "kernels", "parameters"),
    [
        # 15 Conv3D layers and 3,874,961 parameters in the liver HDF5 file.
        (LiverUNet, [(20, 1, 3, 3, 1), (40, 20, 3, 3, 3)], 3_874_961),
        # 21 Conv3D layers (with 6 shortcut projections) and 3,464,221 parameters in the lesion file.
        (LesionUNet, [(20, 1, 3, 3, 1), (40, 20, 3, 3, 3), (40, 1, 1, 1, 1)], 3_464_221),
    ],
)
def test_keras_conv_order(factory, kernels, parameters):
    module = factory()
    order = module.keras_conv_order()

    assert len(order) == {"LiverUNet": 15, "LesionUNet": 21}[factory.__name__]
    assert [tuple(conv.weight.shape) for _, conv in order[: len(kernels)]] == kernels
    assert order[-1][0] == "head"
    assert tuple(order[-1][1].weight.shape) == (1, 20, 1, 1, 1)
    assert sum(p.numel() for p in module.parameters()) == parameters
    assert {name for name, _ in order} == {name.rsplit(".", 1)[0] for name in module.state_dict()}


def test_architecture_factories_registered():
    assert ARCHITECTURES["LiverUNet"] is LiverUNet
    assert ARCHITECTURES["LesionUNet"] is LesionUNet
    assert LIVER_CONFIG.padding == "same"
    assert LIVER_CONFIG.upsampling == "linear"
    assert LESION_CONFIG.padding == "valid"
    assert LESION_CONFIG.residual


def test_config_rejects_even_kernel():
    with pytest.raises(ValueError, match="even"):
        UNetConfig(
            in_channels=1,
            subsample_factors=((1, 1, 1), (2, 2, 2)),
            down_kernels=(((3, 3, 2),), ((3, 3, 3),)),
            down_features=((4,), (8,)),
            up_kernels=(((3, 3, 3),), ()),
            up_features=((4,), ()),
            padding="valid",
            upsampling="nearest",
            residual=False,
        )


def test_config_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="down_features has 1 levels"):
        UNetConfig(
            in_channels=1,
            subsample_factors=((1, 1, 1), (2, 2, 2)),
            down_kernels=(((3, 3, 3),), ((3, 3, 3),)),
            down_features=((4,),),
            up_kernels=(((3, 3, 3),), ()),
            up_features=((4,), ()),
            padding="valid",
            upsampling="nearest",
            residual=False,
        )


def test_nearest_upsampling_in_small_network():
    """A two-level 'valid' network computed by hand with F.conv3d and repeat_interleave."""
    torch.manual_seed(5)
    config = UNetConfig(
        in_channels=1,
        subsample_factors=((1, 1, 1), (2, 2, 2)),
        down_kernels=(((3, 3, 3),), ((3, 3, 3),)),
        down_features=((2,), (3,)),
        up_kernels=(((3, 3, 3),), ()),
        up_features=((2,), ()),
        padding="valid",
        upsampling="nearest",
        residual=False,
    )
    module = UNet3D(config).eval()
    x = torch.randn(1, 1, 14, 14, 14)

    def norm_act(t):
        t64 = t.double()
        mean = t64.mean(dim=(2, 3, 4), keepdim=True)
        std = t64.std(dim=(2, 3, 4), keepdim=True, unbiased=False)
        return F.leaky_relu(((t64 - mean) / (std + 1e-7)).float(), 0.01)

    with torch.no_grad():
        level0 = module.down[0].convs[0](x)  # 12^3, no normalisation on the raw input
        level1 = module.down[1].convs[0](norm_act(F.max_pool3d(level0, 2)))  # 6 -> 4
        up = level1.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)  # 8
        merged = torch.cat([level0[:, :, 2:10, 2:10, 2:10], up], dim=1)
        expected = torch.sigmoid(module.head(norm_act(module.up[0].convs[0](norm_act(merged)))))
        result = module(x)

    assert module.output_size_for((14, 14, 14)) == (6, 6, 6)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
