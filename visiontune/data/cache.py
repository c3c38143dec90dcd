"""A disk cache of decoded, resized uint8 images, shared by epochs, DataLoader workers and runs.

Decoding a JPEG and resizing it costs far more than reading back a small uint8 array, and every
epoch of every run repeats that work for the same files. Each entry is the image as the evaluation
transform would see it after its Resize step: `load_rgb` (EXIF, modes, pixel limit) then the
shorter side resized to `Preprocessing.resize_size` with the same interpolation and torchvision
call, so a cached image gives the same evaluation tensor as a freshly decoded one.

Keys come from `os.stat`, not from hashing file contents: a hit then never reads the source file;
hashing a 110 KB JPEG's bytes (0.07-0.26 ms measured) would add a fifth to four fifths to a hit
(0.3-0.5 ms; benchmarks/decoded_cache.py). The key holds the
absolute path, size, mtime_ns and ctime_ns: rewriting a file changes its ctime even when its mtime
is restored (`cp -p`, `rsync -a`, `os.utime`), so a changed file is never served stale; a renamed or
copied file is a miss, which costs one decode. The pixel limit and resize settings are in the key too.

Entries are HxWx3 `.npy` files (the memory order torchvision's resize returns, so storing copies
nothing; read back as a CHW view) written to a temporary name and moved into place with `os.replace`, so
concurrent writers of one key leave one whole file and readers never see half of one. There is
no fsync: an entry can always be rebuilt, and an unreadable or mis-shaped one is a miss that is
rewritten. The total size is kept under `max_bytes` by deleting the least recently used entries
(a hit touches the file's mtime); deletion tolerates another process deleting the same files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from visiontune.data.images import load_rgb
from visiontune.data.transforms import Preprocessing

log = logging.getLogger(__name__)

CACHE_ENV = "VISIONTUNE_CACHE"  # cache folder
SIZE_ENV = "VISIONTUNE_CACHE_GB"  # size bound in GB (10**9 bytes)
DEFAULT_MAX_GB = 10.0
FORMAT = 1  # bump when decoding or resizing changes, so old entries stop matching
EVICT_TO = 0.9  # evict down to this share of max_bytes, so eviction does not run on every write
RESCAN_SHARE = 0.05  # re-read the folder's total after writing this share of max_bytes
STALE_TMP_S = 3600  # temporary files older than this were left by a crashed writer


def default_cache_root() -> Path:
    """$VISIONTUNE_CACHE, else $XDG_CACHE_HOME/visiontune/decoded, else ~/.cache/visiontune/decoded."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visiontune" / "decoded"


def default_max_bytes() -> int:
    return int(float(os.environ.get(SIZE_ENV, DEFAULT_MAX_GB)) * 1e9)


def resize_rgb(image, size: int, interpolation: str, squash: bool = False) -> torch.Tensor:
    """PIL image or uint8 CHW tensor -> uint8 CHW tensor with its shorter side at `size` (squash: size x size).

    The same torchvision call as `Preprocessing.eval_transform`'s Resize step, so cached and
    uncached evaluation agree exactly.
    """
    mode = InterpolationMode(interpolation if interpolation != "random" else "bilinear")
    shape = [size, size] if squash else [size]
    return v2.functional.resize(v2.functional.to_image(image), shape, interpolation=mode, antialias=True).as_subclass(
        torch.Tensor
    )


class DecodedImageCache:
    """`load(path, max_pixels)` -> uint8 CHW tensor, resized, from the cache or decoded and stored.

    Picklable (a folder and a few numbers), so DataLoader workers each use it directly. An image
    that fails to decode raises `ImageLoadError` as `load_rgb` does and is not cached. A folder
    that cannot be written to only costs the speed-up: images are still returned.
    """

    def __init__(
        self,
        resize_to: int,
        interpolation: str = "bilinear",
        root: str | os.PathLike | None = None,
        max_bytes: int | None = None,
        squash: bool = False,
    ) -> None:
        self.resize_to, self.interpolation, self.squash = int(resize_to), interpolation, squash
        self.root = Path(root) if root is not None else default_cache_root()
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_max_bytes()
        self._total: int | None = None  # bytes in the folder as last scanned plus our writes since
        self._written_since_scan = 0
        self._write_failed = False

    @classmethod
    def for_preprocessing(
        cls, preprocessing: Preprocessing, root: str | os.PathLike | None = None, max_bytes: int | None = None
    ) -> DecodedImageCache:
        """The cache matching `preprocessing`'s evaluation resize (also the start of training crops)."""
        return cls(preprocessing.resize_size, preprocessing.interpolation, root, max_bytes,
                   squash=preprocessing.crop_mode == "squash")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_total": None, "_written_since_scan": 0}  # each worker scans afresh

    # -- reading and writing ----------------------------------------------------------------------

    def load(self, path: str | os.PathLike, max_pixels: int) -> torch.Tensor:
        try:
            entry = self.entry_path(path, max_pixels)
        except OSError:  # missing or unreadable: load_rgb raises the usual ImageLoadError
            return self._decode(path, max_pixels)
        image = self._read(entry)
        if image is not None:
            return image
        image = self._decode(path, max_pixels)
        self._write(entry, image)
        return image

    def entry_path(self, path: str | os.PathLike, max_pixels: int) -> Path:
        """Where `path`'s entry lives; raises OSError if the file cannot be stat-ed."""
        absolute = os.path.abspath(path)  # not resolve(): symlinked paths only cost a second entry
        st = os.stat(absolute)
        fields = (FORMAT, absolute, st.st_size, st.st_mtime_ns, st.st_ctime_ns, max_pixels,
                  self.resize_to, self.interpolation) + (("squash",) if self.squash else ())
        digest = hashlib.sha1(repr(fields).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest[2:]}.npy"

    def _decode(self, path: str | os.PathLike, max_pixels: int) -> torch.Tensor:
        return resize_rgb(load_rgb(path, max_pixels), self.resize_to, self.interpolation, self.squash)

    def _read(self, entry: Path) -> torch.Tensor | None:
        try:
            array = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:  # truncated, corrupt or not an npy file
            log.debug("rebuilding cache entry %s: %s", entry, exc)
            return None
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) != self.resize_to:
            return None
        try:
            os.utime(entry)  # most recently used
        except OSError:
            pass
        return torch.from_numpy(array).permute(2, 0, 1)

    def _write(self, entry: Path, image: torch.Tensor) -> None:
        array = image.permute(1, 2, 0).contiguous().numpy()  # resize's own memory order: no copy
        size = array.nbytes + 128  # the .npy header
        if self._write_failed or size > self.max_bytes:
            return
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{entry.stem}.", suffix=".tmp", dir=entry.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                os.replace(tmp, entry)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("decoded-image cache disabled for this process: cannot write %s: %s", self.root, exc)
            self._write_failed = True
            return
        self._account(size)

    # -- size bound -------------------------------------------------------------------------------

    def _account(self, written: int) -> None:
        """Track the folder's size; other processes' writes are seen at the next rescan."""
        self._written_since_scan += written
        if self._total is None or self._written_since_scan > RESCAN_SHARE * self.max_bytes:
            self._total = self.size_on_disk()
            self._written_since_scan = 0
        else:
            self._total += written
        if self._total > self.max_bytes:
            self._total = self.evict(int(EVICT_TO * self.max_bytes))

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry; removes temporary files left by crashed writers."""
        found = []
        now = time.time()
        for shard in _scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for item in _scandir(Path(shard.path)):
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:  # evicted by another process meanwhile
                    continue
                if item.name.endswith(".npy"):
                    found.append((st.st_mtime, st.st_size, Path(item.path)))
                elif item.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                    Path(item.path).unlink(missing_ok=True)
        return found

    def size_on_disk(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, target_bytes: int) -> int:
        """Delete least recently used entries until at most `target_bytes` remain; returns what remains."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= target_bytes:
                break
            try:
                path.unlink()
            except FileNotFoundError:  # another process got there first: it is gone either way
                pass
            except OSError:
                continue
            total -= size
        return total

    def clear(self) -> None:
        self._total, self._written_since_scan = self.evict(0), 0


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
