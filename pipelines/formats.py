"""Readers for the raw dataset formats that `tools.convert` turns into dataset directories.

    read_idx(path)            IDX files (MNIST, Fashion-MNIST), gzipped or not -> ndarray
    read_cifar_pickle(path)   one CIFAR-10/100 python pickle -> dict with str keys
    cifar_rows_to_hwc(rows)   uint8 [N, 3072] (CHW rows, as stored) -> uint8 [N, 32, 32, 3]
    inspect_image(path)       fully decode one image file: sha256, mode, size, whether it is
                              served as is (`ImageCheck.plain`) or the error
    decode_rgb(path or bytes) the pixels of an image file, uint8 [H, W, 3], for every backend
    image_size(path or bytes) (height, width) of an image file from its header alone
    image_files(folder)       the image files under a folder, recursively (`is_image`)

Every reader raises `FormatError` with a one-line "<problem>: <fix>" message that names the
file, never a bare struct/pickle/zlib exception.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

# Suffixes `tools.convert` reads (any case). The content decides the format: a PNG named .jpg is a
# PNG. Files other than 8-bit RGB/grayscale JPEG or PNG are normalised at conversion (`decode_rgb`
# into a lossless 8-bit RGB PNG), so every backend's decoder reads only those two kinds.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_image(path) -> bool:
    """Whether a file name is one the image readers take: an image suffix, and not hidden (macOS
    leaves `._name.jpg` resource forks that are no images)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, by the suffixes tools.convert reads; sorted
    by their path as a string."""
    return sorted((p for p in folder.rglob("*") if is_image(p) and p.is_file()), key=str)
EXIF_ORIENTATION = 0x0112


class FormatError(ValueError):
    """An input file is truncated, corrupt or not in the format it claims to be."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}: {fix}")
        self.problem = problem
        self.fix = fix

    def __reduce__(self):  # raised in worker processes: must unpickle with both arguments
        return type(self), (self.problem, self.fix)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # gzip magic; decide by content, not by suffix
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise FormatError(f"'{path}': gzip stream is truncated ({len(raw)} compressed bytes)",
                          "re-download the file") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise FormatError(f"'{path}': corrupt gzip data ({e})", "re-download the file") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into a native-endian array of its declared shape.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions, then one
    big-endian uint32 per dimension; the data follows in C order.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    fix = "re-download the file"
    if len(data) < 4:
        raise FormatError(f"'{path}': {len(data)} bytes is too short for an IDX header", fix)
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise FormatError(f"'{path}': bad IDX magic number 0x{data[:4].hex()} "
                          f"(expected 0x0000 then a type byte such as 08 and the rank)", fix)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FormatError(f"'{path}': IDX header declares {ndim} dimensions but the file ends "
                          f"after {len(data)} bytes", fix)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        what = "pixels" if ndim >= 3 else "values"
        raise FormatError(f"'{path}': expected {expected} bytes of {what}, found {found} "
                          f"(header shape {list(shape)})", fix)
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


# Only what a numpy array inside a CIFAR pickle needs: a pickle can otherwise run arbitrary code.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # pickles from numpy < 2
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | Path) -> dict:
    """Load one CIFAR python pickle (a dict with bytes keys) as a dict with str keys."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise FormatError(f"'{path}': not a readable CIFAR pickle ({type(e).__name__}: {e})",
                          "re-download and re-extract the CIFAR archive") from None
    if not isinstance(obj, dict):
        raise FormatError(f"'{path}': CIFAR pickle holds a {type(obj).__name__}, expected a dict",
                          "re-download and re-extract the CIFAR archive")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_rows_to_hwc(rows: np.ndarray, side: int = 32) -> np.ndarray:
    """uint8 [N, 3*side*side] rows (R plane, G plane, B plane) -> uint8 [N, side, side, 3]."""
    n = len(rows)
    return np.ascontiguousarray(rows.reshape(n, 3, side, side).transpose(0, 2, 3, 1))


def _png_header(raw: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if `raw` is not a PNG."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or raw[12:16] != b"IHDR" or len(raw) < 26:
        return None
    return raw[24], raw[25]


def _is_plain(raw: bytes, im) -> bool:
    """True where every backend's decoder renders the file exactly as `decode_rgb` does: an
    8-bit RGB or grayscale JPEG, or an 8-bit RGB/gray PNG without transparency, neither rotated
    by an EXIF orientation tag. Anything else is normalised to a PNG at conversion."""
    if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return False
    if im.format == "JPEG":
        return im.mode in ("RGB", "L")
    if im.format == "PNG":
        header = _png_header(raw)
        idat = raw.find(b"IDAT")
        return header in ((8, 0), (8, 2)) and raw.find(b"tRNS", 0, max(idat, 0)) < 0
    return False


def _to_rgb(im) -> np.ndarray:
    """uint8 [H, W, 3] of a loaded PIL image, as torchvision's decode_image(mode=RGB) renders it:
    alpha dropped (not composited), palette looked up, CMYK inverted as PIL does, 16-bit samples
    scaled to 8 bits by keeping the high byte (torchvision's to_dtype(uint8, scale=True))."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)  # upright, as a viewer shows it; DALI would rotate too
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grayscale (PNG, TIFF)
        gray = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    if im.mode == "F":  # float TIFF: values taken as 0..255
        gray = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _shown_name(source: str | Path | bytes, name: str | None) -> str:
    """The file a message names: `name`, else the path (bytes without a name: '<bytes>')."""
    from pipelines.sources import show_path

    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else source
    return show_path(name)


def decode_rgb(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """The pixels of an image file, uint8 [H, W, 3]: what every backend trains on.

    Raises `FormatError` naming the file (`name`, for bytes) when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    name = _shown_name(source, name)
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise FormatError(f"cannot read image '{name}' ({e.strerror or e})",
                          "re-run tools.convert") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return _to_rgb(im)
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        why = "not an image format PIL recognises"
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, ...
        why = " ".join(f"{type(e).__name__}: {e}".split())
    raise FormatError(f"cannot decode image '{name}' ({why})", "re-run tools.convert")


def image_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image file as stored (no EXIF rotation), read from its header: PIL
    decodes no pixels until asked. Raises `FormatError` naming the file when PIL cannot."""
    from PIL import Image, UnidentifiedImageError

    name = _shown_name(source, name)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.height, im.width
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        why = "not an image format PIL recognises"
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, ...
        why = " ".join(f"{type(e).__name__}: {e}".split())
    raise FormatError(f"cannot read the size of image '{name}' ({why})", "re-run tools.convert")


@dataclass(frozen=True, slots=True)  # one per image: keep it small for ImageNet-sized folders
class ImageCheck:
    """What decoding one image file found; `error` is None when it decoded completely."""

    sha256: str | None
    error: str | None = None
    mode: str | None = None  # PIL mode: "RGB", "L", "CMYK", ...
    size: tuple[int, int] | None = None  # (width, height)
    format: str | None = None  # "JPEG", "PNG", ... (by content, not by suffix)
    nbytes: int = 0  # the file's length
    plain: bool = False  # served as is; otherwise normalised to a PNG at conversion (`_is_plain`)


def inspect_image(path: str | Path) -> ImageCheck:
    """Read a file once, hash it, and fully decode it with PIL (so truncation is caught)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        return ImageCheck(sha256=None, error=f"unreadable: {e.strerror or e}")
    digest = hashlib.sha256(raw).hexdigest()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            plain = _is_plain(raw, im)
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn
            size = im.size[::-1] if turned else im.size
            return ImageCheck(digest, mode=im.mode, size=size, format=im.format,
                              nbytes=len(raw), plain=plain)
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        return ImageCheck(digest, error="not an image format PIL recognises")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return ImageCheck(digest, error=f"{type(e).__name__}: {e}".splitlines()[0])
