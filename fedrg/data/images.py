"""Image readers (chosen by suffix, pluggable) and resampling to the configured tensor shape.

Every reader returns a float32 array in one orientation convention: a 3D volume is
``(D, H, W)`` with axial slices along ``D`` (inferior to superior), rows running anterior to
posterior and columns right to left (the DICOM display convention, LPS); a 2D image is
``(H, W)``. :func:`prepare_image` then takes the middle axial slice (2d mode) or the whole
volume (3d mode), resamples it to ``data_cfg.image_shape`` and scales intensities robustly
to ``[0, 1]`` (0.5th and 99.5th percentiles), which removes each scanner's intensity scale
and offset but not its contrast.

Add a format with :func:`register_reader`::

    register_reader([".mha"], my_reader)   # my_reader(path) -> np.ndarray
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrg.config import DataConfig
from fedrg.errors import ImageReadError

ImageReader = Callable[[Path], np.ndarray]

_READERS: dict[str, ImageReader] = {}
#: Key under which the reader for a directory (a DICOM series) is registered.
DIRECTORY = "<dir>"
#: Largest image accepted, in voxels (a 1024 x 1024 x 512 volume; 2 GiB as float32).
MAX_VOXELS = 1024 * 1024 * 512


def check_voxels(shape: Iterable[int], path: Path) -> None:
    """Refuse an image of more than :data:`MAX_VOXELS` voxels (before reading its pixels
    where the format allows)."""
    dims = [int(d) for d in shape]
    n = int(np.prod(dims, dtype=np.int64)) if dims else 0
    if n > MAX_VOXELS:
        raise ImageReadError(
            f"image {path} has {n:,} voxels ({' x '.join(map(str, dims))}), more than the limit "
            f"of {MAX_VOXELS:,}; crop or downsample it before adding it to the cohort"
        )


def register_reader(suffixes: Iterable[str], reader: ImageReader) -> None:
    """Register ``reader`` for files whose name ends with one of ``suffixes``.

    Parameters
    ----------
    suffixes:
        Lower-case name endings including the dot (``".nii.gz"``), or :data:`DIRECTORY`.
    reader:
        ``reader(path) -> np.ndarray`` returning ``(H, W)`` or ``(D, H, W)`` (see module doc);
        it raises on unreadable input (any exception becomes :class:`ImageReadError`).
    """
    for s in suffixes:
        _READERS[s.lower()] = reader


def supported_suffixes() -> list[str]:
    """Name endings with a registered reader (longest first)."""
    return sorted((s for s in _READERS if s != DIRECTORY), key=lambda s: (-len(s), s))


def reader_for(path: Path) -> ImageReader:
    """The reader for ``path`` (a directory is read as a DICOM series)."""
    if path.is_dir():
        return _READERS[DIRECTORY]
    name = path.name.lower()
    for suffix in supported_suffixes():
        if name.endswith(suffix):
            return _READERS[suffix]
    raise ImageReadError(
        f"image {path}: no reader for this file type; supported: "
        f"{', '.join(supported_suffixes())}, or a folder holding one DICOM series"
    )


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file or DICOM series folder into a float32 array.

    Raises
    ------
    ImageReadError
        Missing, truncated, corrupt or unsupported file; the message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"image {p} does not exist")
    reader = reader_for(p)
    try:
        arr = np.asarray(reader(p))
    except ImageReadError:
        raise
    except Exception as err:  # readers raise many types on damaged files
        raise ImageReadError(
            f"image {p} is truncated or corrupt ({type(err).__name__}: {err})"
        ) from None
    return _check_array(arr, p)


def _check_array(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(f"image {p} holds non-numeric data of type {arr.dtype}")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"image {p} has shape {arr.shape}; expected a 2D image or 3D volume")
    check_voxels(arr.shape, p)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ImageReadError(f"image {p} contains NaN or infinite values")
    return arr


# --------------------------------------------------------------------------- readers

def read_nifti(path: Path) -> np.ndarray:
    """NIfTI-1/2 (.nii, .nii.gz) via nibabel; 4D series give their first volume."""
    import nibabel as nib

    img: Any = nib.load(str(path))  # a Nifti1/2Image (nibabel's stubs say FileBasedImage)
    check_voxels(img.shape[:3], path)  # from the header, before reading the data
    if len(img.shape) == 4:
        img = img.slicer[..., 0]
    img = nib.as_closest_canonical(img)  # RAS: i left->right, j post->ant, k inf->sup
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ImageReadError(f"image {path} has {data.ndim} dimensions; expected 2 to 4")
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def _dicom_pixels(ds) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:
        arr = arr.mean(axis=-1)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def read_dicom_file(path: Path) -> np.ndarray:
    """One DICOM file (single slice or multi-frame) via pydicom."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ImageReadError(f"image {path} is a DICOM file without pixel data")
    return _dicom_pixels(ds)


def read_dicom_series(path: Path) -> np.ndarray:
    """A folder holding the slices of one DICOM series, stacked along the slice normal."""
    import pydicom

    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise ImageReadError(f"image folder {path} is empty; it must hold one DICOM series")
    slices = []
    for i, f in enumerate(files):
        try:
            if i == 0:  # rows x columns x files, from the first header, before any pixels
                head = pydicom.dcmread(str(f), stop_before_pixels=True)
                check_voxels((len(files), int(getattr(head, "Rows", 0) or 0),
                              int(getattr(head, "Columns", 0) or 0)), path)
            ds = pydicom.dcmread(str(f))
            pixels = _dicom_pixels(ds)
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(
                f"image {f} (in series folder {path}) is truncated or corrupt "
                f"({type(err).__name__}: {err})"
            ) from None
        slices.append((ds, pixels))
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series) > 1:
        raise ImageReadError(
            f"image folder {path} holds {len(series)} DICOM series; put each series in its own folder"
        )
    shapes = {p.shape for _, p in slices}
    if len(shapes) > 1:
        raise ImageReadError(f"image folder {path} mixes slice shapes {sorted(shapes)}")
    if len(slices) == 1:
        return slices[0][1]

    def position(item: tuple) -> float:
        ds = item[0]
        iop = getattr(ds, "ImageOrientationPatient", None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        if iop is not None and ipp is not None and len(iop) == 6:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            return float(np.dot(normal, np.asarray(ipp, float)))
        return float(getattr(ds, "InstanceNumber", 0) or 0)

    check_series_complete(path, [ds for ds, _ in slices])
    slices.sort(key=position)
    return np.stack([p for _, p in slices])


def check_series_complete(path: Path, datasets: list[Any]) -> None:
    """Refuse a DICOM series with a missing or duplicated slice.

    Checks instance numbers (duplicates; gaps in the run of consecutive numbers) and, when
    every slice has a position and orientation, slice positions along the slice normal
    (duplicates; a gap larger than 1.5 times the typical spacing).

    Raises
    ------
    ImageReadError
        Naming the folder, the instance numbers or positions concerned, and the fix.
    """
    fix = "re-export the complete series (one file per slice, each slice once)"
    numbers = [getattr(ds, "InstanceNumber", None) for ds in datasets]
    if all(n is not None and str(n).strip() != "" for n in numbers):
        nums = sorted(int(str(n)) for n in numbers)
        dups = sorted({n for n in nums if nums.count(n) > 1})
        if dups:
            raise ImageReadError(f"DICOM series folder {path}: duplicated slice(s), instance "
                                 f"number(s) {', '.join(map(str, dups))} appear more than once; "
                                 f"{fix}")
        gaps = sorted(set(range(nums[0], nums[-1] + 1)) - set(nums))
        if gaps:
            shown = ", ".join(map(str, gaps[:10])) + (" ..." if len(gaps) > 10 else "")
            raise ImageReadError(f"DICOM series folder {path}: missing slice(s), instance "
                                 f"number(s) {shown} absent between {nums[0]} and {nums[-1]}; "
                                 f"{fix}")
    pos = []
    for ds in datasets:
        iop = getattr(ds, "ImageOrientationPatient", None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        if iop is None or ipp is None or len(iop) != 6:
            return
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        pos.append(float(np.dot(normal, np.asarray(ipp, float))))
    pos.sort()
    steps = np.diff(pos)
    if (steps < 1e-3).any():
        raise ImageReadError(f"DICOM series folder {path}: two slices share the position "
                             f"{pos[int(np.argmin(steps))]:.2f} mm along the slice normal "
                             f"(a duplicated slice); {fix}")
    if len(steps) >= 2:
        typical = float(np.median(steps))
        big = np.flatnonzero(steps > 1.5 * typical)
        if big.size:
            i = int(big[0])
            raise ImageReadError(
                f"DICOM series folder {path}: slice positions jump from {pos[i]:.2f} to "
                f"{pos[i + 1]:.2f} mm while slices are {typical:.2f} mm apart (a missing "
                f"slice); {fix}")


def read_png(path: Path) -> np.ndarray:
    """PNG via Pillow (colour images are converted to grey)."""
    from PIL import Image

    with Image.open(path) as opened:
        opened.load()
        im: Image.Image = opened
        if im.mode not in ("L", "I", "I;16", "F"):
            im = im.convert("L")
        return np.asarray(im, dtype=np.float32)


def read_npy(path: Path) -> np.ndarray:
    """NumPy ``.npy`` array, ``(H, W)`` or ``(D, H, W)`` in the module's convention."""
    return np.load(path, allow_pickle=False)


register_reader([".nii", ".nii.gz"], read_nifti)
register_reader([".dcm", ".dicom"], read_dicom_file)
register_reader([DIRECTORY], read_dicom_series)
register_reader([".png"], read_png)
register_reader([".npy"], read_npy)


# --------------------------------------------------------------------------- preprocessing

def _resize(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    if tuple(arr.shape) == shape:
        return arr.astype(np.float32)
    if arr.ndim == 2:
        out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=True)
    else:
        shrink = tuple(min(a, s) for a, s in zip(arr.shape, shape, strict=True))
        if shrink != tuple(arr.shape):
            t = F.adaptive_avg_pool3d(t, shrink)
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def normalise_intensity(arr: np.ndarray) -> np.ndarray:
    """Scale to ``[0, 1]`` between the 0.5th and 99.5th percentiles (constant image -> zeros)."""
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if not hi > lo:
        return np.zeros_like(arr, dtype=np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def prepare_image(arr: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """Turn a read image into the model's input: ``[1, H, W]`` (2d) or ``[1, D, H, W]`` (3d).

    2d mode takes the middle axial slice of a volume; 3d mode repeats a 2D image along depth.
    """
    shape = tuple(data_cfg.image_shape)
    if data_cfg.image_mode == "2d":
        plane = arr if arr.ndim == 2 else arr[arr.shape[0] // 2]
        out = _resize(plane, shape)
    else:
        vol = arr if arr.ndim == 3 else arr[None]
        out = _resize(vol, shape)
    return normalise_intensity(out)[None]


def load_image(path: str | Path, data_cfg: DataConfig) -> np.ndarray:
    """:func:`read_image` then :func:`prepare_image`."""
    return prepare_image(read_image(path), data_cfg)
