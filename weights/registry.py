"""Pinned source of the trained networks and the description of each model.

The weights come from the PyPI wheel pyliverlesionseg 0.3 (KU Leuven, Apache-2.0), which ships
two Keras 2.2 HDF5 weight files. The wheel is pinned by its SHA-256 so that a changed upload is
rejected instead of silently giving other weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.networks import (
    LESION_DEFAULT_OUTPUT_SIZE,
    LIVER_DEFAULT_OUTPUT_SIZE,
    LesionUNet,
    LiverUNet,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSpec:
    """A pinned Python wheel that contains model weights.

    Attributes
    ----------
    package, version : str
        PyPI project name and exact version.
    file_name : str
        Wheel file name as published.
    sha256 : str
        Lower-case hex SHA-256 of the wheel file.
    licence : str
        SPDX identifier of the licence covering the wheel and its weights.
    citation : str
        Publication to cite when using the models.
    """

    package: str
    version: str
    file_name: str
    sha256: str
    licence: str
    citation: str

    @property
    def requirement(self) -> str:
        """Requirement string for pip, e.g. ``pyliverlesionseg==0.3``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """One trained network inside the wheel.

    Attributes
    ----------
    name : str
        Registry key (``"liver"`` or ``"lesion"``), also the converted file's stem.
    member : str
        Path of the Keras HDF5 weight file inside the wheel.
    voxel_size_mm : tuple of float
        Voxel spacing (x, y, z) in mm the network was trained on, as stored in the HDF5
        ``header/voxel_size`` dataset.
    input_size, output_size : tuple of int
        Default input and output tile sizes (x, y, z) in voxels.
    architecture : str
        Name of the factory in ``pipeline.networks.ARCHITECTURES`` that builds the module.
    description : str
        Human-readable summary.
    """

    name: str
    member: str
    voxel_size_mm: tuple[float, float, float]
    input_size: tuple[int, int, int]
    output_size: tuple[int, int, int]
    architecture: str
    description: str

    @property
    def file_name(self) -> str:
        """File name of the converted PyTorch state dict in the cache."""
        return f"{self.name}.pt"


WHEEL = WheelSpec(
    package="pyliverlesionseg",
    version="0.3",
    file_name="pyliverlesionseg-0.3-py3-none-any.whl",
    sha256="ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8",
    licence="Apache-2.0",
    citation=(
        "Tang X, et al. Whole liver segmentation based on deep learning and manual adjustment "
        "for clinical use in SIRT. Eur J Nucl Med Mol Imaging. 2020;47. "
        "doi:10.1007/s00259-020-04800-3"
    ),
)

_TRAINED_MODELS = "pyliverlesionseg/trained_models"

MODELS: dict[str, ModelSpec] = {
    "liver": ModelSpec(
        name="liver",
        member=(
            f"{_TRAINED_MODELS}/model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_"
            "20201011_dice_loss_val_binary_dice_mean.hdf5"
        ),
        voxel_size_mm=(3.0, 3.0, 3.0),
        input_size=(189, 162, 162),
        output_size=LIVER_DEFAULT_OUTPUT_SIZE,
        architecture=LiverUNet.__name__,
        description=(
            "Whole-liver U-Net for CT and MR on 3 mm isotropic voxels; 'same' padding, "
            "pooling by 3 per level, linear upsampling"
        ),
    ),
    "lesion": ModelSpec(
        name="lesion",
        member=(
            f"{_TRAINED_MODELS}/model_unet_ct_mr_lesion_seg_resize_1mm_1mm_3mm_"
            "20220207_dice_loss_val_binary_dice_mean.hdf5"
        ),
        voxel_size_mm=(1.0, 1.0, 3.0),
        input_size=(180, 172, 86),
        output_size=LESION_DEFAULT_OUTPUT_SIZE,
        architecture=LesionUNet.__name__,
        description=(
            "Liver-lesion U-Net for CT and MR on 1 x 1 x 3 mm voxels; 'valid' padding, "
            "residual blocks, pooling by 2 per level, nearest upsampling"
        ),
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name``.

    Raises
    ------
    KeyError
        If ``name`` is not a registered model; the message lists the registered names.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(MODELS)}") from None
