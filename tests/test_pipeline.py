"""Pipeline pieces on small arrays: normalisation, body crop, tiling, post-processing, volumes.

The tiling tests use a tiny crop-only module in place of a network, so the geometry of the
stitching can be checked exactly. The real networks run in the end-to-end tests.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.analysis import _to_ras
from pipeline.inference import (
    MemoryBudgetError,
    ModelHandle,
    check_memory_budget,
    plan_tiles,
    sliding_window_predict,
)
from pipeline.measurements import measure
from pipeline.memory import PeakRssSampler, current_rss_mb
from pipeline.postprocessing import dilate_liver, largest_liver_region, remove_small_components
from pipeline.preprocessing import body_bounding_box, lesion_network_input, normalise_ct
from pipeline.resample import grid_shape_for_spacing, resize_volume


class CentreCrop(torch.nn.Module):
    """Returns the centre of its input, shifted by +1: a network-shaped stand-in with known output."""

    def __init__(self, margin: tuple[int, int, int]) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, my, mz = self.margin
        return x[:, :, mx : x.shape[2] - mx, my : x.shape[3] - my, mz : x.shape[4] - mz] + 1.0


def crop_handle(input_size=(12, 10, 8), output_size=(8, 6, 4)) -> ModelHandle:
    margin = tuple((i - o) // 2 for i, o in zip(input_size, output_size))
    return ModelHandle(
        name="crop",
        module=CentreCrop(margin),
        voxel_size_mm=(1.0, 1.0, 1.0),
        input_size=input_size,
        output_size=output_size,
        sha256="0" * 64,
        peak_bytes_per_input_voxel=100.0,
    )


def test_normalise_ct_range() -> None:
    hu = np.array([-1000.0, -200.0, 0.0, 100.0, 200.0, 3000.0])
    expected = np.array([-0.5, -0.5, 0.0, 0.25, 0.5, 0.5], dtype=np.float32)
    assert np.allclose(normalise_ct(hu), expected)
    assert normalise_ct(hu).dtype == np.float32


@pytest.mark.parametrize("shape", [(20, 17, 9), (8, 6, 4), (3, 2, 1), (25, 6, 13)])
def test_sliding_window_covers_volume(shape: tuple[int, int, int]) -> None:
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    result = sliding_window_predict(volume, crop_handle())
    assert result.shape == shape
    assert np.allclose(result, volume + 1.0)


def test_sliding_window_overlap_averages() -> None:
    volume = np.random.default_rng(1).normal(size=(21, 13, 9)).astype(np.float32)
    result = sliding_window_predict(volume, crop_handle(), overlap=0.5)
    assert np.allclose(result, volume + 1.0, atol=1e-6)


def test_sliding_window_edge_padding() -> None:
    # Along z the edge planes repeat; in-plane the pad value shows through the margins.
    volume = np.zeros((8, 6, 2), dtype=np.float32)
    volume[:, :, 1] = 5.0
    handle = crop_handle(input_size=(8, 6, 6), output_size=(8, 6, 2))
    assert np.allclose(sliding_window_predict(volume, handle, edge_axes=(2,)), volume + 1.0)


def test_sliding_window_skips_unrequired_tiles() -> None:
    volume = np.ones((16, 6, 4), dtype=np.float32)
    required = np.zeros(volume.shape, dtype=bool)
    required[1, 1, 1] = True
    result = sliding_window_predict(volume, crop_handle(), required=required)
    assert np.allclose(result[:8], 2.0)
    assert np.allclose(result[8:], 0.0)


def test_sliding_window_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(np.zeros((4, 4, 4), np.float32), crop_handle(), overlap=1.0)


def test_memory_budget_rejected_up_front() -> None:
    handle = crop_handle()
    check_memory_budget(handle, budget_mb=100.0, baseline_mb=10.0)
    with pytest.raises(MemoryBudgetError, match="memory_budget_mb is 10"):
        check_memory_budget(handle, budget_mb=10.0, baseline_mb=9.99)


def test_body_box_excludes_air_and_table() -> None:
    hu = np.full((120, 100, 10), -1000.0, dtype=np.float32)
    hu[30:90, 20:70, :] = 40.0  # body
    hu[10:110, 90:94, :] = 300.0  # table, separated from the body by air
    box = body_bounding_box(hu, (1.0, 1.0, 5.0), margin_mm=5.0)
    assert box[2] == slice(0, 10)
    assert box[0].start <= 30
    assert box[0].stop >= 90
    assert box[1].start <= 20
    assert box[1].stop >= 70
    assert box[1].stop < 90
    assert box[0].start >= 30 - 5 - 6
    assert box[0].stop <= 90 + 5 + 6


def test_body_box_of_empty_volume_is_whole() -> None:
    hu = np.full((10, 10, 3), -1000.0, dtype=np.float32)
    assert body_bounding_box(hu, (1.0, 1.0, 1.0)) == (slice(0, 10), slice(0, 10), slice(0, 3))


def test_largest_liver_region_drops_islands() -> None:
    probabilities = np.zeros((30, 30, 30), dtype=np.float32)
    probabilities[5:20, 5:20, 5:20] = 0.9
    probabilities[25:28, 25:28, 25:28] = 0.9
    region = largest_liver_region(probabilities, 0.5)
    assert region[10, 10, 10]
    assert not region[26, 26, 26]
    assert not largest_liver_region(np.zeros((5, 5, 5), np.float32), 0.5).any()


def test_remove_small_components() -> None:
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:6, 2:6, 2:6] = True
    mask[15, 15, 15] = True
    kept = remove_small_components(mask, min_voxels=8)
    assert kept[3, 3, 3]
    assert not kept[15, 15, 15]


def test_lesion_input_masks_outside_liver() -> None:
    normalised = np.full((4, 4, 4), 0.2, dtype=np.float32)
    region = np.zeros((4, 4, 4), dtype=bool)
    region[1:3, 1:3, 1:3] = True
    masked = lesion_network_input(normalised, dilate_liver(region, 0))
    assert masked[1, 1, 1] == pytest.approx(0.2)
    assert masked[0, 0, 0] == pytest.approx(-0.5)


def test_measure_volumes_and_burden() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:5] = 1
    labels[0, 0, 0] = 2
    labels[9, 9, 9] = 2
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    result = measure(labels, affine)
    assert result.voxel_volume_mm3 == pytest.approx(6.0)
    assert result.liver_voxels == 499
    assert result.tumor_voxels == 2
    assert result.liver_volume_ml == pytest.approx(2.99, abs=0.01)
    assert result.tumor_volume_ml == pytest.approx(0.01, abs=0.005)
    assert result.tumor_burden_percent == pytest.approx(100 * 2 / 501, abs=0.01)
    assert result.tumor_count == 2


def test_measure_tumour_free() -> None:
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    result = measure(labels, np.eye(4))
    assert result.tumor_burden_percent == 0.0
    assert result.tumor_count == 0


def test_orientation_round_trip() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.array([[-0.8, 0, 0, 100], [0, 0, 2.5, -50], [0, 0.8, 0, 20], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    ras, ras_affine, back = _to_ras(image)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    restored = nib.orientations.apply_orientation(ras, back)
    assert np.array_equal(restored, data)
    # The same voxel has the same world position in both grids.
    assert np.allclose(affine @ [1, 2, 3, 1], ras_affine @ [4 - 1 - 1, 3, 2, 1])


def test_resize_round_trip_and_grid_shape() -> None:
    assert grid_shape_for_spacing((100, 80, 30), (0.8, 0.8, 2.0), (3.0, 3.0, 3.0)) == (27, 21, 20)
    volume = np.zeros((12, 12, 12), dtype=np.float32)
    volume[4:8, 4:8, 4:8] = 1.0
    up = resize_volume(volume, (24, 24, 24), mode="nearest")
    assert np.array_equal(resize_volume(up, (12, 12, 12), mode="nearest"), volume)


def test_peak_rss_sampler() -> None:
    before = current_rss_mb()
    with PeakRssSampler() as sampler:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB
        block.sum()
    assert sampler.peak_mb >= before + 50


def test_plan_tiles_fits_lesion_region() -> None:
    from pipeline.networks import LesionUNet

    module = LesionUNet()
    handle = ModelHandle(
        name="lesion",
        module=module,
        voxel_size_mm=(1.0, 1.0, 3.0),
        input_size=module.default_input_size,
        output_size=module.default_output_size,
        sha256="0" * 64,
        peak_bytes_per_input_voxel=460.0,
    )
    planned = plan_tiles((223, 190, 46), handle)
    assert planned.output_size[2] >= 46
    assert planned.output_size[2] <= int(42 * 1.2)
    assert planned.output_size[0] * 3 >= 223
    assert planned.output_size[0] <= 92
    assert module.output_size_for(planned.input_size) == planned.output_size

    small = plan_tiles((10, 10, 5), handle)
    assert all(out >= n for out, n in zip(small.output_size, (10, 10, 5)))
    assert module.output_size_for(small.input_size) == small.output_size


def test_liver_input_median_only_for_fine_voxels() -> None:
    from pipeline.preprocessing import liver_network_input

    rng = np.random.default_rng(3)
    coarse = rng.normal(40.0, 30.0, size=(20, 20, 10)).astype(np.float32)
    # Voxels already at the network's 3 mm: no median filter, values only normalised.
    assert np.allclose(liver_network_input(coarse, (3.0, 3.0, 3.0), (3.0, 3.0, 3.0)), normalise_ct(coarse))

    fine = rng.normal(40.0, 30.0, size=(40, 40, 20)).astype(np.float32)
    filtered = liver_network_input(fine, (0.75, 0.75, 1.5), (3.0, 3.0, 3.0))
    assert filtered.shape == (10, 10, 10)
    # The median filter removes most of the noise that plain averaging would leave.
    assert filtered.std() < normalise_ct(fine).std() / 2


def test_precision_auto_follows_cpu_support() -> None:
    from node.analysis import use_bfloat16
    from pipeline.inference import bfloat16_supported

    assert use_bfloat16("bfloat16") is True
    assert use_bfloat16("float32") is False
    assert use_bfloat16("auto") is bfloat16_supported()


def test_bfloat16_tiles_close_to_float32() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 1, 1), torch.nn.Sigmoid()).eval()
    handle = ModelHandle("lesion", module, (1.0, 1.0, 1.0), (8, 8, 8), (8, 8, 8), "0" * 64, 100.0)
    volume = np.random.default_rng(0).uniform(-0.5, 0.5, size=(16, 12, 8)).astype(np.float32)

    exact = sliding_window_predict(volume, handle)
    reduced = sliding_window_predict(volume, handle, bfloat16=True)

    assert reduced.dtype == np.float32
    assert np.abs(reduced - exact).max() < 0.02
    assert not np.array_equal(reduced, exact)


def test_resize_region_matches_whole_resize() -> None:
    volume = np.random.default_rng(3).normal(size=(40, 30, 20)).astype(np.float32)
    region = (slice(5, 50), slice(0, 17), slice(33, 41))

    whole = resize_volume(volume, (90, 17, 41))
    part = resize_volume(volume, (90, 17, 41), region=region)

    assert part.shape == (45, 17, 8)
    assert np.allclose(part, whole[region], atol=1e-6)


def test_resize_int16_view_matches_torch() -> None:
    import torch.nn.functional as F

    volume = np.random.default_rng(4).integers(-1000, 1000, size=(37, 29, 23)).astype(np.int16)[::-1, :, ::-1]
    expected = F.interpolate(
        torch.from_numpy(volume.astype(np.float32))[None, None], size=(20, 61, 23), mode="trilinear", align_corners=False
    )[0, 0].numpy()

    assert np.allclose(resize_volume(volume, (20, 61, 23)), expected, rtol=0, atol=0.01)


def test_to_ras_keeps_int16_view() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.0, 1.0]))

    ras, _, _ = _to_ras(image)

    assert ras.dtype == np.int16
    assert np.shares_memory(ras, data)


def test_median_filter_slabs_match_scipy() -> None:
    from scipy import ndimage

    from pipeline.preprocessing import median_filter

    volume = np.random.default_rng(5).normal(size=(23, 17, 11)).astype(np.float32)

    assert np.array_equal(median_filter(volume, 3, workers=3), ndimage.median_filter(volume, size=3))
