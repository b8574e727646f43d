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
from collections.abc import Iterator, Sequence
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

#: Number of voxels per partial sum in instance normalisation, computed in the tensor's dtype.
#: PyTorch accumulates a bfloat16 sum in float32 and rounds only the result. The partial sums
#: are added in float64.
_SUM_BLOCK = 1024

#: Channels of the upsampled tensor built, normalised and convolved at a time on the expanding
#: path. The first convolution of the liver network's finest expanding block then keeps about
#: 1.7 GiB instead of 3.5 GiB for the default tile in float32.
UPSAMPLE_GROUP_CHANNELS = 10

#: The same for bfloat16 tensors: the liver tile took 4.4 s instead of 5.0 s with about 2 %
#: more peak memory (902 MiB) than with groups of 10.
UPSAMPLE_GROUP_CHANNELS_BFLOAT16 = 40

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


def _channel_view(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return ``x`` as a ``(N, voxels, C)`` view when it is channels-last, else ``(N * C, voxels)``.

    The second value indicates which of the two layouts the view has. Neither copies ``x``.
    """
    batch, channels = x.shape[:2]
    if channels > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.permute(0, 2, 3, 4, 1).view(batch, -1, channels), True
    return x.reshape(batch * channels, -1), False


def _blocked_sum(flat: torch.Tensor, channels_last: bool, square: bool) -> torch.Tensor:
    """Sum over the voxel axis of a channel view in float32 blocks added in float64.

    With ``square`` the sum of squares is taken (the squared norm of each block).
    """
    axis = 1 if channels_last else -1
    voxels = flat.shape[axis]
    whole = voxels - voxels % _SUM_BLOCK
    if channels_last:
        batch, _, channels = flat.shape
        blocks = flat[:, :whole].view(batch, whole // _SUM_BLOCK, _SUM_BLOCK, channels)
        tail = flat[:, whole:]
        block_axis = 2
    else:
        rows = flat.shape[0]
        blocks = flat[:, :whole].view(rows, whole // _SUM_BLOCK, _SUM_BLOCK)
        tail = flat[:, whole:]
        block_axis = -1
    if square:
        partial = torch.linalg.vector_norm(blocks, dim=block_axis).double().square().sum(dim=1)
        return partial + tail.double().square().sum(dim=axis)
    partial = blocks.sum(dim=block_axis).double().sum(dim=1)
    return partial + tail.double().sum(dim=axis)


def instance_normalize(
    x: torch.Tensor, epsilon: float = INSTANCE_NORM_EPSILON, *, inplace: bool = False
) -> torch.Tensor:
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
        Tensor of shape ``(N, C, X, Y, Z)``, contiguous or channels-last
        (``torch.channels_last_3d``).
    epsilon : float
        Value added to the standard deviation.
    inplace : bool
        Overwrite ``x`` with the result instead of allocating a new tensor. Use it only when
        nothing else reads ``x`` afterwards.

    Returns
    -------
    torch.Tensor
        Tensor with the shape, dtype and memory format of ``x`` (``x`` itself when
        ``inplace``).
    """
    if not inplace:
        x = x.clone(memory_format=torch.preserve_format)
    flat, channels_last = _channel_view(x)
    if flat.data_ptr() != x.data_ptr() or not flat.is_contiguous():
        raise ValueError("instance_normalize needs a contiguous or channels-last tensor")
    voxels = flat.shape[1]

    mean = _blocked_sum(flat, channels_last, square=False) / voxels
    mean_rounded = mean.to(x.dtype)
    # Broadcast the per-(sample, channel) statistics over the voxel axis of the view.
    expand = (lambda v: v[:, None, :]) if channels_last else (lambda v: v[:, None])
    flat.sub_(expand(mean_rounded))

    # The variance is taken around the float32-rounded mean and corrected for the rounding.
    squares = _blocked_sum(flat, channels_last, square=True)
    rounding = mean - mean_rounded.double()
    variance = (squares / voxels - rounding.square()).clamp_min(0.0)
    scale = 1.0 / (variance.sqrt() + epsilon)

    # centred * scale - rounding * scale, in place.
    offset = expand((-rounding * scale).to(x.dtype))
    torch.addcmul(offset, flat, expand(scale.to(x.dtype)), out=flat)
    return x


def _normalize_activate_(x: torch.Tensor) -> torch.Tensor:
    """Instance-normalise and activate ``x`` in place; the caller gives up ``x``."""
    return F.leaky_relu_(instance_normalize(x, inplace=True), LEAKY_RELU_SLOPE)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Return channels-last when ``x`` is stored channels-last with several channels."""
    if x.ndim == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _upsample_linear_axis(x: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    length = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = factor * (length - 1) + 1
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))

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


def _weights_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """Return convolution weights channels-last, so oneDNN keeps channels-last activations."""
    return weight.contiguous(memory_format=torch.channels_last_3d)


def _conv(in_channels: int, out_channels: int, kernel: Size3, padding: str) -> nn.Conv3d:
    pad = tuple(k // 2 for k in kernel) if padding == "same" else 0
    return nn.Conv3d(in_channels, out_channels, kernel_size=kernel, padding=pad)


def pointwise_conv(
    conv: nn.Conv3d, x: torch.Tensor, in_channels: slice | None = None, bias: bool = True
) -> torch.Tensor:
    """Apply a 1x1x1 ``conv`` to ``x`` as a matrix product.

    On CPU, PyTorch 2.13's oneDNN convolution was about 20 times slower than a BLAS matrix
    product for a 1x1x1 kernel with few output channels (0.52 s against 0.02 s for the 20 -> 1
    head on a 163 x 136 x 136 tile, 2 threads on an AMD EPYC).

    Parameters
    ----------
    conv : torch.nn.Conv3d
        Convolution with a 1x1x1 kernel.
    x : torch.Tensor
        Tensor of shape ``(N, C, X, Y, Z)``, contiguous, channels-last or a crop of either.
    in_channels : slice or None
        Input channels of ``conv`` that ``x`` holds, when ``x`` is one part of a concatenated
        input; None for all of them.
    bias : bool
        Add the convolution's bias.

    Returns
    -------
    torch.Tensor
        Tensor of shape ``(N, out_channels, X, Y, Z)``, channels-last when ``x`` has several
        channels and is channels-last.
    """
    batch, channels = x.shape[:2]
    weight = conv.weight.view(conv.out_channels, conv.in_channels)
    if in_channels is not None:
        weight = weight[:, in_channels]
    if channels > 1 and _memory_format(x) == torch.channels_last_3d:
        # (N, X, Y, Z, C) rows times the transposed weight: no copy of x.
        out = torch.matmul(x.permute(0, 2, 3, 4, 1), weight.t())
        if bias and conv.bias is not None:
            out += conv.bias
        return out.permute(0, 4, 1, 2, 3)
    out = torch.matmul(weight, x.reshape(batch, channels, -1))
    if bias and conv.bias is not None:
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
        self.padding = padding
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

    def output_size_for(self, input_size: Sequence[int]) -> Size3:
        """Return the spatial size of the block output for an input of ``input_size``."""
        if self.padding != "valid":
            return tuple(int(n) for n in input_size)
        return tuple(
            int(n) - sum(conv.kernel_size[axis] - 1 for conv in self.convs)
            for axis, n in enumerate(input_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(N, C, X, Y, Z)``; ``x`` is left unchanged."""
        if not self.raw_input:
            x = x.clone(memory_format=torch.preserve_format)
        return self.forward_parts(iter([(0, x)]))

    def forward_parts(self, parts: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Apply the block to an input given as channel groups, consuming each group.

        The first convolution is linear in its input channels, so it is computed group by
        group (``conv(concat(a, b)) = conv_a(a) + conv_b(b)``) and the concatenated input is
        never built. Normalisation and activation act per channel, so each group is normalised
        on its own, in place. Each group is released as soon as it has been used; only the
        running sum of the first convolution's output stays.

        Parameters
        ----------
        parts : iterator of (int, torch.Tensor)
            First input channel of each group and the group, ``(N, c, X, Y, Z)``, all of the
            same spatial size. The block overwrites the groups; the iterator must not keep them.

        Returns
        -------
        torch.Tensor
            The block output.
        """
        first = self.convs[0]
        out: torch.Tensor | None = None
        shortcut: torch.Tensor | None = None
        for offset, part in parts:
            selection = slice(offset, offset + part.shape[1])
            if self.residual:
                # The shortcut reads the block input before it is normalised in place.
                cropped = center_crop(part, self.output_size_for(part.shape[2:]))
                if self.shortcut is not None:
                    contribution = pointwise_conv(self.shortcut, cropped, selection, bias=False)
                else:
                    contribution = cropped.clone(memory_format=torch.preserve_format)
                del cropped
                shortcut = contribution if shortcut is None else shortcut.add_(contribution)
                del contribution

            if not self.raw_input:
                part = _normalize_activate_(part)
            bias = first.bias if out is None else None
            partial = F.conv3d(part, _weights_channels_last(first.weight[:, selection]), bias, padding=first.padding)
            del part
            out = partial if out is None else out.add_(partial)
            del partial
        if out is None:
            raise ValueError("ConvBlock.forward_parts needs at least one input group")

        for conv in self.convs[1:]:
            out = F.conv3d(_normalize_activate_(out), _weights_channels_last(conv.weight), conv.bias, padding=conv.padding)

        if shortcut is not None:
            if self.shortcut is not None and self.shortcut.bias is not None:
                shortcut += self.shortcut.bias.view(1, -1, 1, 1, 1)
            out = out.add_(shortcut)
        return out


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

        # Channels-last tensors let oneDNN convolve without reordering copies of input and
        # output (1.8 GiB less for a 40 -> 40 convolution on the default liver tile).
        x = x.contiguous(memory_format=torch.channels_last_3d)
        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.down):
            if level > 0:
                ratio = self.config.level_ratio(level)
                x = F.max_pool3d(x, kernel_size=ratio, stride=ratio)
            x = block.forward_parts(iter([(0, x)]))
            skips.append(x)
        skips.pop()

        for level in reversed(range(len(self.up))):
            ratio = self.config.level_ratio(level + 1)
            size = self._upsampled_size(x.shape[2:], ratio)
            # The holder is emptied by the parts generator so that no frame keeps the skip alive.
            skip_holder = [center_crop(skips.pop(), size).contiguous(memory_format=torch.channels_last_3d)]
            x = self.up[level].forward_parts(self._expanding_parts(skip_holder, x, ratio))

        x = pointwise_conv(self.head, _normalize_activate_(x))
        return torch.sigmoid_(x)

    def _upsampled_size(self, size: Sequence[int], ratio: Size3) -> Size3:
        if self.config.upsampling == "linear":
            return tuple(r * (int(n) - 1) + 1 for n, r in zip(size, ratio))
        return tuple(r * int(n) for n, r in zip(size, ratio))

    def _expanding_parts(
        self, skip_holder: list[torch.Tensor], coarse: torch.Tensor, ratio: Size3
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield the cropped skip, then the upsampled coarse tensor in channel groups.

        Yields (first channel, group) pairs in the channel order of the Keras concatenation
        ``[skip, upsampled]``. Each group is built only when the block requests it.
        """
        skip_channels = skip_holder[0].shape[1]
        yield 0, skip_holder.pop()
        channels = coarse.shape[1]
        step = UPSAMPLE_GROUP_CHANNELS_BFLOAT16 if coarse.dtype == torch.bfloat16 else UPSAMPLE_GROUP_CHANNELS
        for start in range(0, channels, step):
            stop = min(channels, start + step)
            group = coarse[:, start:stop].contiguous(memory_format=torch.channels_last_3d)
            yield skip_channels + start, self._upsample(group, ratio).contiguous(
                memory_format=torch.channels_last_3d
            )

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
