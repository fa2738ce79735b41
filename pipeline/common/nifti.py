"""NIfTI images out of predictions, and NIfTI files as bytes.

`label_image` / `probability_image` build the images `pipeline.predict` writes and the pyfunc
model returns: on the input's voxel grid, with the input's qform and sform as they are.
`to_bytes` / `from_bytes` carry a whole NIfTI file in memory (the pyfunc model's `image` input
and `labels` output, base64 in JSON over HTTP): gzip-compressed out, plain or gzip in.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

GZIP_MAGIC = b"\x1f\x8b"


def label_image(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """A label NIfTI (uint8, or uint16 for merged maps) on the input's grid, with its qform/sform codes."""
    return _like_input(labels, affine, header, labels.dtype.type)


def probability_image(probabilities: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """A float32 4D NIfTI (x, y, z, class) of (class, x, y, z) probabilities."""
    return _like_input(np.moveaxis(probabilities, 0, -1).astype(np.float32), affine, header, np.float32)


def _like_input(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, dtype: type) -> nib.Nifti1Image:
    """The input's qform and sform as they are (a qform cannot hold shear, so it is never derived
    from a sheared affine); a form the input leaves unset (code 0) becomes `affine`, code 1."""
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    qform, qform_code = header.get_qform(coded=True)
    sform, sform_code = header.get_sform(coded=True)
    image.set_qform(qform if qform_code else affine, code=int(qform_code) or 1)
    image.set_sform(sform if sform_code else affine, code=int(sform_code) or 1)
    image.header.set_xyzt_units(*header.get_xyzt_units())
    image.set_data_dtype(dtype)
    return image


def to_bytes(image: nib.Nifti1Image) -> bytes:
    """The image as the bytes of a .nii.gz file (gzip without a timestamp: same image, same bytes)."""
    return gzip.compress(image.to_bytes(), mtime=0)


def from_bytes(data: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI-1 or NIfTI-2 image from the bytes of a .nii or .nii.gz file. Raises ValueError."""
    try:
        raw = gzip.decompress(data) if data[:2] == GZIP_MAGIC else bytes(data)
    except (OSError, EOFError) as err:
        raise ValueError(f"not a readable .nii.gz ({err})") from None
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return kind.from_bytes(raw)
        except (HeaderDataError, ImageFileError, WrapStructError, ValueError, EOFError):
            continue
    raise ValueError(f"not a NIfTI file ({len(raw)} bytes, no NIfTI-1 or NIfTI-2 header)")
