"""PyTorch U-Nets for the pyliverlesionseg 0.3 liver and liver-lesion models.

Both networks follow the generic 3D U-Net of pyliverlesionseg 0.3 (KU Leuven, Apache-2.0;
Tang et al., EJNMMI 47, 2020), rebuilt here so that its Keras 2.2 weights can be loaded
without TensorFlow. Every level of the contracting path applies its convolutions at the level's
subsampling factor, and every level of the expanding path concatenates the centrally cropped
skip tensor with the upsampled coarser tensor before its own convolutions:

- every convolution except the very first one is preceded by instance normalisation
  (``(x - mean) / (std + 1e-7)`` per channel over the spatial axes, no learned parameters)
  and a leaky ReLU (negative slope 0.01);
- optional residual connections add the block input, centrally cropped and projected by a
  1x1x1 convolution when the channel count changes, to the output of the last convolution of
  a block;
- the head is normalisation, leaky ReLU, a 1x1x1 convolution and a sigmoid.

Tensors are ``(N, C, X, Y, Z)`` float32 with Z the slice axis, in RAS array order.
Output tiles are smaller than input tiles, so each network reports which tile sizes are valid
(:meth:`UNet3D.output_size_for` and :meth:`UNet3D.input_size_for`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

Size3 = tuple[int, int, int]

#: Epsilon added to the standard deviation by the instance normalisation (Keras ``K.epsilon()``).
INSTANCE_NORM_EPSILON = 1e-7

#: Negative slope of the leaky ReLU activations (Keras ``LeakyReLU(alpha=0.01)``).
LEAKY_RELU_SLOPE = 0.01

#: Number of voxels per float32 partial sum in instance normalisation; the partial sums are
#: added in float64.
_SUM_BLOCK = 1024

#: How far :meth:`UNet3D.input_size_for` searches above the requested output length.
_MAX_SIZE_MARGIN = 4096


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a generic 3D U-Net as built by pyliverlesionseg 0.3.

    Level 0 is the full-resolution level. Kernel sizes are ``(kx, ky, kz)`` and must be odd.

    Attributes
    ----------
    in_channels : int
        Number of input channels.
    subsample_factors : tuple of Size3
        Subsampling factor of each level relative to the input, per axis. Each factor must be
        an integer multiple of the previous one.
    down_kernels, down_features : tuple of tuples
        Kernel size and number of output channels of each convolution on the contracting path,
        per level.
    up_kernels, up_features : tuple of tuples
        Kernel size and number of output channels of each convolution on the expanding path,
        per level. The coarsest level has none.
    padding : {"same", "valid"}
        Convolution padding. ``"same"`` pads with zeros so that convolutions keep the size.
    upsampling : {"nearest", "linear"}
        ``"nearest"`` repeats each voxel ``s`` times per axis. ``"linear"`` does the same and
        then averages over an ``s x s x s`` window with stride 1 and no padding, which shrinks
        each axis by ``s - 1``.
    residual : bool
        Whether each block adds its (cropped, projected) input to its output.
    out_channels : int
        Number of output probability channels.
    """

    in_channels: int
    subsample_factors: tuple[Size3, ...]
    down_kernels: tuple[tuple[Size3, ...], ...]
    down_features: tuple[tuple[int, ...], ...]
    up_kernels: tuple[tuple[Size3, ...], ...]
    up_features: tuple[tuple[int, ...], ...]
    padding: Literal["same", "valid"]
    upsampling: Literal["nearest", "linear"]
    residual: bool
    out_channels: int = 1

    def __post_init__(self) -> None:
        levels = len(self.subsample_factors)
        lengths = {
            "down_kernels": len(self.down_kernels),
            "down_features": len(self.down_features),
            "up_kernels": len(self.up_kernels),
            "up_features": len(self.up_features),
        }
        for field_name, length in lengths.items():
            if length != levels:
                raise ValueError(
                    f"UNetConfig.{field_name} has {length} levels but subsample_factors has "
                    f"{levels}; give one entry per level"
                )

        if self.subsample_factors[0] != (1, 1, 1):
            raise ValueError(
                f"UNetConfig.subsample_factors[0] is {self.subsample_factors[0]}; level 0 must "
                "be the full-resolution level (1, 1, 1)"
            )
        for level in range(1, levels):
            for coarse, fine in zip(self.subsample_factors[level], self.subsample_factors[level - 1]):
                if coarse % fine != 0:
                    raise ValueError(
                        f"UNetConfig.subsample_factors[{level}] = {self.subsample_factors[level]} "
                        f"is not an integer multiple of {self.subsample_factors[level - 1]}"
                    )

        for level in range(levels):
            if len(self.down_kernels[level]) != len(self.down_features[level]):
                raise ValueError(f"UNetConfig level {level}: down_kernels and down_features differ in length")
            if len(self.up_kernels[level]) != len(self.up_features[level]):
                raise ValueError(f"UNetConfig level {level}: up_kernels and up_features differ in length")
            if not self.down_kernels[level]:
                raise ValueError(f"UNetConfig level {level} has no contracting-path convolution")
        if self.up_kernels[-1]:
            raise ValueError("UNetConfig: the coarsest level must have no expanding-path convolutions")
        if levels > 1 and not self.up_kernels[0]:
            raise ValueError("UNetConfig: level 0 needs at least one expanding-path convolution")

        # The Keras builder inserts AveragePooling3D layers of size 2 to realign the sampling grids
        # of a skip connection when a kernel of even size shifts them by half a voxel. With odd
        # kernels those layers have size 1 (identity), so this module omits them and rejects
        # even kernels.
        for kernels in self.down_kernels + self.up_kernels:
            for kernel in kernels:
                if any(k % 2 == 0 for k in kernel):
                    raise ValueError(
                        f"UNetConfig kernel size {kernel} is even; only odd kernel sizes are supported"
                    )

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.subsample_factors)

    def level_ratio(self, level: int) -> Size3:
        """Return the pooling factor between ``level - 1`` and ``level``, per axis."""
        coarse = self.subsample_factors[level]
        fine = self.subsample_factors[level - 1]
        return (coarse[0] // fine[0], coarse[1] // fine[1], coarse[2] // fine[2])


def _split_blocks(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rows of a 2D tensor into whole blocks (a view) and the remaining tail."""
    rows, length = flat.shape
    whole = length - length % _SUM_BLOCK
    return flat[:, :whole].view(rows, whole // _SUM_BLOCK, _SUM_BLOCK), flat[:, whole:]


def instance_normalize(x: torch.Tensor, epsilon: float = INSTANCE_NORM_EPSILON) -> torch.Tensor:
    """Normalise each channel of each sample to zero mean and unit standard deviation.

    Computes ``(x - mean) / (std + epsilon)`` over the spatial axes with the population
    (biased) standard deviation, like the Keras ``Lambda`` layers of pyliverlesionseg.

    A float32 sum of squares accumulated over millions of voxels in one run is off by about
    1e-3 relative, as TensorFlow's float32 ``K.std`` is. Here float32 partial sums over blocks
    of ``_SUM_BLOCK`` voxels are added in float64 instead. On
    5 M-voxel channels this matched a float64 computation to within 2e-6 on the output,
    without a float64 copy of the tensor.

    Parameters
    ----------
    x : torch.Tensor
        Tensor of shape ``(N, C, X, Y, Z)``.
    epsilon : float
        Value added to the standard deviation.

    Returns
    -------
    torch.Tensor
        New contiguous tensor with the shape and dtype of ``x``.
    """
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    voxels = flat.shape[1]

    blocks, tail = _split_blocks(flat)
    mean = (blocks.sum(dim=-1).double().sum(dim=-1) + tail.double().sum(dim=-1)) / voxels
    mean_rounded = mean.to(x.dtype)
    centred = flat - mean_rounded[:, None]

    # The variance is taken around the float32-rounded mean and corrected for the rounding.
    blocks, tail = _split_blocks(centred)
    squares = torch.linalg.vector_norm(blocks, dim=-1).double().square().sum(dim=-1)
    squares += tail.double().square().sum(dim=-1)
    rounding = mean - mean_rounded.double()
    variance = (squares / voxels - rounding.square()).clamp_min(0.0)
    scale = 1.0 / (variance.sqrt() + epsilon)

    # centred * scale - rounding * scale, in place.
    offset = (-rounding * scale).to(x.dtype)[:, None]
    torch.addcmul(offset, centred, scale.to(x.dtype)[:, None], out=centred)
    return centred.view(x.shape)


def _normalize_activate(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu_(instance_normalize(x), LEAKY_RELU_SLOPE)


def _upsample_linear_axis(x: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    length = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = factor * (length - 1) + 1
    out = x.new_empty(shape)

    # Output sample factor * k + r lies at r / factor between input samples k and k + 1.
    lower = x.narrow(axis, 0, length - 1)
    upper = x.narrow(axis, 1, length - 1)
    grid = out.narrow(axis, 0, factor * (length - 1)).unflatten(axis, (length - 1, factor))
    for offset in range(factor):
        target = grid.select(axis + 1, offset)
        if offset == 0:
            target.copy_(lower)
        else:
            torch.lerp(lower, upper, offset / factor, out=target)
    out.narrow(axis, shape[axis] - 1, 1).copy_(x.narrow(axis, length - 1, 1))
    return out


def upsample_linear(x: torch.Tensor, factors: Size3) -> torch.Tensor:
    """Upsample the spatial axes like the Keras builder's ``linear`` upsampling.

    Keras repeats each voxel ``s`` times per axis (``UpSampling3D``) and then averages over an
    ``s x s x s`` window with stride 1 and no padding (``AveragePooling3D``), so an axis of
    length ``n`` becomes ``s * (n - 1) + 1``. That equals separable linear interpolation at
    positions ``j / s`` (output sample ``s * k + r`` is ``((s - r) * x[k] + r * x[k + 1]) / s``),
    which is computed here axis by axis in one pass each.

    Parameters
    ----------
    x : torch.Tensor
        Tensor of shape ``(N, C, X, Y, Z)``.
    factors : Size3
        Upsampling factor per spatial axis.

    Returns
    -------
    torch.Tensor
        Contiguous tensor of shape ``(N, C, s_x * (X - 1) + 1, ...)``.
    """
    for axis, factor in enumerate(factors, start=2):
        if factor > 1:
            x = _upsample_linear_axis(x, axis, factor)
    return x


def center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` symmetrically to ``size`` (like Keras ``Cropping3D``).

    Raises
    ------
    ValueError
        If an axis of ``x`` is smaller than ``size`` or differs from it by an odd number.
    """
    slices = [slice(None), slice(None)]
    for axis, (have, want) in enumerate(zip(x.shape[2:], size)):
        margin = have - want
        if margin < 0 or margin % 2:
            raise ValueError(
                f"cannot crop spatial axis {axis} from {have} to {want} symmetrically; "
                "use a tile size reported by output_size_for/input_size_for"
            )
        slices.append(slice(margin // 2, have - margin // 2))
    return x[tuple(slices)]


def _conv(in_channels: int, out_channels: int, kernel: Size3, padding: str) -> nn.Conv3d:
    pad = tuple(k // 2 for k in kernel) if padding == "same" else 0
    return nn.Conv3d(in_channels, out_channels, kernel_size=kernel, padding=pad)


def pointwise_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1x1 ``conv`` to ``x`` as a matrix product.

    On CPU, PyTorch 2.13's oneDNN convolution was about 20 times slower than a BLAS matrix
    product for a 1x1x1 kernel with few output channels (0.52 s against 0.02 s for the 20 -> 1
    head on a 163 x 136 x 136 tile, 2 threads on an AMD EPYC).
    """
    batch, channels = x.shape[:2]
    weight = conv.weight.view(conv.out_channels, channels)
    out = torch.matmul(weight, x.reshape(batch, channels, -1))
    if conv.bias is not None:
        out += conv.bias.view(1, -1, 1)
    return out.view(batch, conv.out_channels, *x.shape[2:])


class ConvBlock(nn.Module):
    """Convolutions of one level of one path, with an optional residual connection.

    Parameters
    ----------
    in_channels : int
        Channels of the block input.
    kernels, features : sequence
        Kernel size and output channels of each convolution.
    padding : str
        ``"same"`` or ``"valid"``.
    residual : bool
        Add the centrally cropped block input (through a 1x1x1 convolution when the channel
        count changes) to the output of the last convolution.
    raw_input : bool
        Skip normalisation and activation before the first convolution (true only for the first
        block of the network, whose input is the image itself).
    """

    def __init__(
        self,
        in_channels: int,
        kernels: tuple[Size3, ...],
        features: tuple[int, ...],
        padding: str,
        residual: bool,
        raw_input: bool = False,
    ) -> None:
        super().__init__()
        self.raw_input = raw_input
        self.convs = nn.ModuleList()
        channels = in_channels
        for kernel, out_channels in zip(kernels, features):
            self.convs.append(_conv(channels, out_channels, kernel, padding))
            channels = out_channels
        self.out_channels = channels

        self.residual = residual
        self.shortcut: nn.Conv3d | None = None
        if residual and in_channels != channels:
            self.shortcut = _conv(in_channels, channels, (1, 1, 1), padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(N, C, X, Y, Z)``."""
        # A residual block keeps its input for the shortcut.
        block_input = x if self.residual else None
        for index, conv in enumerate(self.convs):
            if index > 0 or not self.raw_input:
                x = _normalize_activate(x)
            x = conv(x)

        if block_input is not None:
            shortcut = center_crop(block_input, x.shape[2:])
            if self.shortcut is not None:
                shortcut = pointwise_conv(self.shortcut, shortcut)
            x = x.add_(shortcut)
        return x


class UNet3D(nn.Module):
    """Generic 3D U-Net mapping ``(N, C, X, Y, Z)`` images to sigmoid probabilities.

    Parameters
    ----------
    config : UNetConfig
        Architecture description.
    default_output_size : Size3 or None
        Output tile size used when callers do not choose one; it must be a valid output size.
    """

    def __init__(self, config: UNetConfig, default_output_size: Size3 | None = None) -> None:
        super().__init__()
        self.config = config

        self.down = nn.ModuleList()
        channels = config.in_channels
        skip_channels = []
        for level in range(config.levels):
            block = ConvBlock(
                channels,
                config.down_kernels[level],
                config.down_features[level],
                config.padding,
                config.residual,
                raw_input=(level == 0),
            )
            self.down.append(block)
            channels = block.out_channels
            skip_channels.append(channels)

        # up[level] is the expanding-path block of `level`. The coarsest level has none.
        self.up = nn.ModuleList()
        up_channels: list[int] = [0] * config.levels
        up_channels[-1] = channels
        blocks: dict[int, ConvBlock] = {}
        for level in reversed(range(config.levels - 1)):
            block = ConvBlock(
                skip_channels[level] + up_channels[level + 1],
                config.up_kernels[level],
                config.up_features[level],
                config.padding,
                config.residual,
            )
            blocks[level] = block
            up_channels[level] = block.out_channels
        for level in range(config.levels - 1):
            self.up.append(blocks[level])

        self.head = nn.Conv3d(up_channels[0], config.out_channels, kernel_size=1)

        self.default_output_size: Size3 | None = None
        self.default_input_size: Size3 | None = None
        if default_output_size is not None:
            self.default_input_size = self.input_size_for(default_output_size)
            self.default_output_size = tuple(default_output_size)

    def keras_conv_order(self) -> list[tuple[str, nn.Conv3d]]:
        """Return the convolutions in the order the Keras builder created them.

        Keras names its layers ``conv3d_1``, ``conv3d_2``, ... in creation order: the
        contracting path from level 0 down (each block's convolutions, then its shortcut
        projection), the expanding path from the second-coarsest level up, then the head.

        Returns
        -------
        list of (str, torch.nn.Conv3d)
            State-dict prefix and module of each convolution.
        """
        ordered: list[tuple[str, nn.Conv3d]] = []

        def add_block(prefix: str, block: ConvBlock) -> None:
            for index, conv in enumerate(block.convs):
                ordered.append((f"{prefix}.convs.{index}", conv))
            if block.shortcut is not None:
                ordered.append((f"{prefix}.shortcut", block.shortcut))

        for level, block in enumerate(self.down):
            add_block(f"down.{level}", block)
        for level in reversed(range(len(self.up))):
            add_block(f"up.{level}", self.up[level])
        ordered.append(("head", self.head))
        return ordered

    def _upsample(self, x: torch.Tensor, ratio: Size3) -> torch.Tensor:
        if self.config.upsampling == "linear":
            return upsample_linear(x, ratio)
        if ratio == (1, 1, 1):
            return x
        size = [n * r for n, r in zip(x.shape[2:], ratio)]
        return F.interpolate(x, size=size, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute probabilities for ``x`` of shape ``(N, in_channels, X, Y, Z)``.

        Returns
        -------
        torch.Tensor
            Probabilities of shape ``(N, out_channels, x, y, z)`` with ``(x, y, z)`` given by
            :meth:`output_size_for`.

        Raises
        ------
        ValueError
            If the input shape is not a valid tile.
        """
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected an input of shape (N, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}"
            )
        self.output_size_for(tuple(x.shape[2:]))

        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.down):
            if level > 0:
                ratio = self.config.level_ratio(level)
                x = F.max_pool3d(x, kernel_size=ratio, stride=ratio)
            x = block(x)
            skips.append(x)
        skips.pop()

        for level in reversed(range(len(self.up))):
            x = self._upsample(x, self.config.level_ratio(level + 1))
            skip = center_crop(skips.pop(), x.shape[2:])
            x = torch.cat([skip, x], dim=1)
            del skip
            x = self.up[level](x)

        x = pointwise_conv(self.head, _normalize_activate(x))
        return torch.sigmoid_(x)

    def _output_length(self, length: int, axis: int) -> int | None:
        """Map an input length along ``axis`` to the output length, or None if invalid."""
        config = self.config
        valid = config.padding == "valid"
        skip_lengths = []
        for level in range(config.levels):
            if level > 0:
                ratio = config.level_ratio(level)[axis]
                if length % ratio:
                    return None
                length //= ratio
            if valid:
                length -= sum(kernel[axis] - 1 for kernel in config.down_kernels[level])
            if length <= 0:
                return None
            skip_lengths.append(length)

        for level in reversed(range(config.levels - 1)):
            ratio = config.level_ratio(level + 1)[axis]
            length *= ratio
            if config.upsampling == "linear":
                length -= ratio - 1
            margin = skip_lengths[level] - length
            if margin < 0 or margin % 2:
                return None
            if valid:
                length -= sum(kernel[axis] - 1 for kernel in config.up_kernels[level])
            if length <= 0:
                return None
        return length

    def valid_output_lengths(self, axis: int, max_input_length: int) -> list[tuple[int, int]]:
        """Return every valid ``(input length, output length)`` pair along ``axis``.

        Parameters
        ----------
        axis : int
            0, 1 or 2 for X, Y or Z.
        max_input_length : int
            Largest input length considered.

        Returns
        -------
        list of tuple of int
            Pairs sorted by input length.
        """
        pairs = []
        for length in range(1, max_input_length + 1):
            output = self._output_length(length, axis)
            if output is not None and output > 0:
                pairs.append((length, output))
        return pairs

    def output_size_for(self, input_size: tuple[int, int, int]) -> Size3:
        """Return the output tile size for an input tile size ``(X, Y, Z)``.

        Raises
        ------
        ValueError
            If ``input_size`` is not a valid input tile (pooling needs divisible sizes and skip
            connections need symmetric crops).
        """
        output = []
        for axis, length in enumerate(input_size):
            result = self._output_length(int(length), axis)
            if result is None:
                nearby = [n for n in range(max(1, length - 64), length + 65) if self._output_length(n, axis)]
                raise ValueError(
                    f"input size {tuple(input_size)} is not valid along axis {axis}; "
                    f"valid input lengths near {length}: {nearby[:8]}"
                )
            output.append(result)
        return tuple(output)

    def input_size_for(self, output_size: tuple[int, int, int]) -> Size3:
        """Return the smallest input tile size that yields the output tile size ``(x, y, z)``.

        Raises
        ------
        ValueError
            If no input tile yields ``output_size`` along some axis.
        """
        inputs = []
        for axis, length in enumerate(output_size):
            length = int(length)
            found = None
            nearby = set()
            for candidate in range(max(1, length), length + _MAX_SIZE_MARGIN):
                result = self._output_length(candidate, axis)
                if result == length:
                    found = candidate
                    break
                if result is not None and abs(result - length) <= 64:
                    nearby.add(result)
                if result is not None and result > length + 64:
                    break
            if found is None:
                raise ValueError(
                    f"output size {tuple(output_size)} is not reachable along axis {axis}; "
                    f"valid output lengths near {length}: {sorted(nearby)[:8]}"
                )
            inputs.append(found)
        return tuple(inputs)


#: Liver model (model_unet_ct_mr_liv_seg_..._20201011): 3 mm isotropic voxels, 'same' padding,
#: pooling by 3 per level, linear upsampling.
LIVER_CONFIG = UNetConfig(
    in_channels=1,
    subsample_factors=((1, 1, 1), (3, 3, 3), (9, 9, 9), (27, 27, 27)),
    down_kernels=(
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 3), (3, 3, 3)),
    ),
    down_features=((20, 40), (40, 80), (80, 160), (160, 160)),
    up_kernels=(
        ((3, 3, 3), (3, 3, 1)),
        ((3, 3, 3), (3, 3, 1)),
        ((3, 3, 3), (3, 3, 1)),
        (),
    ),
    up_features=((40, 20), (80, 40), (160, 80), ()),
    padding="same",
    upsampling="linear",
    residual=False,
)

#: Lesion model (model_unet_ct_mr_lesion_seg_..._20220207): 1 x 1 x 3 mm voxels, 'valid'
#: padding, pooling by 2 per level, nearest upsampling, residual connections.
LESION_CONFIG = UNetConfig(
    in_channels=1,
    subsample_factors=((1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)),
    down_kernels=(
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 1), (3, 3, 3)),
        ((3, 3, 1), (3, 3, 3)),
    ),
    down_features=((20, 40), (40, 80), (80, 160), (160, 160)),
    up_kernels=(
        ((3, 3, 3), (3, 3, 1)),
        ((3, 3, 3), (3, 3, 1)),
        ((3, 3, 3), (3, 3, 1)),
        (),
    ),
    up_features=((40, 20), (80, 40), (160, 80), ()),
    padding="valid",
    upsampling="nearest",
    residual=True,
)

#: Output tile sizes (x, y, z) the original pipeline used for each model.
LIVER_DEFAULT_OUTPUT_SIZE: Size3 = (163, 136, 136)
LESION_DEFAULT_OUTPUT_SIZE: Size3 = (92, 84, 42)


def LiverUNet() -> UNet3D:  # noqa: N802 - factory named after the architecture it builds
    """Build the liver U-Net (input 189 x 162 x 162 -> output 163 x 136 x 136 by default)."""
    return UNet3D(LIVER_CONFIG, default_output_size=LIVER_DEFAULT_OUTPUT_SIZE)


def LesionUNet() -> UNet3D:  # noqa: N802 - factory named after the architecture it builds
    """Build the lesion U-Net (input 180 x 172 x 86 -> output 92 x 84 x 42 by default)."""
    return UNet3D(LESION_CONFIG, default_output_size=LESION_DEFAULT_OUTPUT_SIZE)


#: Factories by the name used in ``weights.registry``.
ARCHITECTURES = {"LiverUNet": LiverUNet, "LesionUNet": LesionUNet}
