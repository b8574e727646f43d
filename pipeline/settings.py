"""Settings of the image analysis, independent of the service configuration."""

from __future__ import annotations

from dataclasses import dataclass

#: Probability above which a voxel is labelled, as in the original pipeline.
DEFAULT_THRESHOLD = 0.5

#: Cranio-caudal coverage, in mm, below which the node reports a series as not analysable.
#: The liver network was run on cranio-caudal crops of the 3 mm TotalSegmentator example CT
#: and scored against its liver label. Dice was 0.963 on the whole 336 mm and 0.960 on the
#: 126 mm liver extent. On 81 mm through the liver centre it was 0.952 (volume 5 % low), and
#: on 42 mm it was 0.859 (volume 19 % low); a real 40 mm slab of another CT scored 0.845.
#: Such slabs still get a result, with a partial-coverage warning that the volume covers only
#: the imaged part; below 30 mm the node reports "not analysable".
#: NOTE: 30 mm itself was not measured; the curve comes from one CT and one slab.
DEFAULT_MIN_ANALYSABLE_COVERAGE_MM = 30.0


@dataclass(frozen=True)
class AnalysisSettings:
    """Parameters of one liver and liver-tumour analysis.

    Attributes
    ----------
    torch_threads: int
        Number of intra-op threads PyTorch may use (default 2).
    memory_budget_mb: int
        Peak memory the analysis may use, in MiB (default 6000). A tile plan whose estimated peak
        exceeds it is rejected before any inference starts.
    body_threshold_hu: float
        HU above which a voxel counts as body when the body is cropped (default -500).
    body_margin_mm: float
        Margin added around the body bounding box, in mm (default 10).
    tile_overlap: float
        Fraction of a network output tile shared with its neighbours, 0 to < 1 (default 0.0).
    fit_lesion_tiles: bool
        Fit the lesion network's tiles to the liver region (default True): at most 20 % larger
        per axis than the trained 92 x 84 x 42 output tile, fewer and evenly sized. False uses
        the trained tile size, as the original pipeline did.
    liver_threshold: float
        Probability threshold of the liver network (default 0.5).
    tumor_threshold: float
        Probability threshold of the lesion network (default 0.5).
    liver_dilation_voxels: int
        Dilations of the liver mask, on the lesion network's grid, that give the region in which
        the lesion network looks for tumours (default 2, as in the original pipeline).
    min_tumor_volume_ml: float
        Tumour components smaller than this are relabelled as liver, in mL (default 0: keep all).
    min_coverage_mm: float
        Cranio-caudal coverage below which the result carries a partial-coverage warning, in mm
        (default 150: an adult liver spans about 150 to 200 mm).
    min_analysable_coverage_mm: float
        Cranio-caudal coverage below which the networks are not run and the result is
        "not analysable", in mm (default 0: always analyse). The node passes
        ``analysis.min_analysable_coverage_mm``, whose default is
        :data:`DEFAULT_MIN_ANALYSABLE_COVERAGE_MM`.
    bfloat16: bool
        Run both networks under bfloat16 autocast (default False).
    """

    torch_threads: int = 2
    memory_budget_mb: int = 6000
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0
    tile_overlap: float = 0.0
    fit_lesion_tiles: bool = True
    liver_threshold: float = DEFAULT_THRESHOLD
    tumor_threshold: float = DEFAULT_THRESHOLD
    liver_dilation_voxels: int = 2
    min_tumor_volume_ml: float = 0.0
    min_coverage_mm: float = 150.0
    min_analysable_coverage_mm: float = 0.0
    bfloat16: bool = False
