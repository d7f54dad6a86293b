"""Download a data set's official files, check their md5, and unpack the archives among them.

``DATASETS`` says where each data set's files are, with their md5 and size: the Oxford-IIIT Pet archives
(unpacked) and Fashion-MNIST's four gzipped idx files (read as they are). Each file is streamed to
``<root>/<name>.part`` while its md5 is computed, and only renamed to ``<root>/<name>`` when the md5 matches, so a
half-written or corrupt download never sits under the final name. Each file's size is known: a mirror that sends
more is cut off there, and the ``.part`` file is removed however the download ends (an error, Ctrl-C, SIGTERM
through the CLI). Nothing is extracted until every archive has been verified and every tar member has been checked
to stay inside ``root``. A file already present with the right md5 is not fetched again. Only `aepretrain download`
calls this: reading a data set never downloads.
"""

import hashlib
import http.client
import os
import sys
import tarfile
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from aepretrain.errors import UserError

from .cache import cache_root

OXFORD_PETS_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
OXFORD_PETS_ARCHIVES = {  # name: (md5, size in bytes) of the official files
    "images.tar.gz": ("5c4f3ee8e5d25df40f4fd59a7f44e54c", 791918971),
    "annotations.tar.gz": ("95a8c909bbe2e81eed6a22bccdf3f68f", 19173078),
}
FASHION_MNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # name: (md5, size in bytes), as the zalandoresearch/fashion-mnist README publishes them
    "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
    "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe", 29515),
    "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79", 4422102),
    "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310", 5148),
}


@dataclass(frozen=True)
class Downloadable:
    """Where a data set's files are (``base_url`` + name), their md5 and size, and whether they are tar.gz archives
    to unpack into the download folder."""
    base_url: str
    files: dict[str, tuple[str, int]]
    unpack: bool


DATASETS = {
    "oxford-pets": Downloadable(OXFORD_PETS_BASE_URL, OXFORD_PETS_ARCHIVES, unpack=True),
    "fashion-mnist": Downloadable(FASHION_MNIST_BASE_URL, FASHION_MNIST_FILES, unpack=False),
}

_CHUNK_BYTES = 1 << 20
_PROGRESS_EVERY_BYTES = 16 << 20
_TIMEOUT_S = 60.0


def downloaded_root(dataset: str) -> Path:
    """Where `aepretrain download --dataset DATASET` puts the files when no --root is given, and where reading the
    data set looks after its usual places: ``datasets/DATASET`` in the cache folder (``$AEPRETRAIN_CACHE``, else
    ``$XDG_CACHE_HOME/aepretrain`` or ``~/.cache/aepretrain``), where `aepretrain cache clear` does not reach."""
    return cache_root(None) / "datasets" / dataset


def download(dataset: str, root: str | Path, base_url: str | None = None,
             files: dict[str, tuple[str, int]] | None = None, progress: bool = True) -> Path:
    """Fetch ``dataset``'s files (a key of ``DATASETS``) into ``root``, verify each, and unpack its archives.

    ``base_url`` (a mirror) and ``files`` (name: md5, size) replace the official ones. Raises ``UserError`` on a
    network error, an HTTP error, a size or md5 mismatch, a corrupt or unsafe archive, or a ``root`` that cannot
    be written; no file whose md5 is wrong is left behind.
    """
    source = DATASETS[dataset]
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create download folder {root}: {exc}") from exc

    base = base_url or source.base_url
    base = base if base.endswith("/") else base + "/"
    paths = []
    for name, (expected_md5, size) in (files or source.files).items():
        path = root / name
        if path.is_file() and path.stat().st_size == size and _file_md5(path) == expected_md5:
            if progress:
                print(f"{name}: already present, md5 ok", file=sys.stderr)
        else:
            _download_verified(base + name, path, expected_md5, size, progress)
        paths.append(path)

    if source.unpack:
        _extract_all(paths, root)
    return root


def download_oxford_pets(
    root: str | Path,
    base_url: str = OXFORD_PETS_BASE_URL,
    archives: dict[str, tuple[str, int]] = OXFORD_PETS_ARCHIVES,
    progress: bool = True,
) -> Path:
    """Fetch, verify and extract the Oxford-IIIT Pet archives into ``root``.

    ``archives`` maps each archive's file name (appended to ``base_url``) to its
    md5 and size. After a successful call ``root/images/`` and ``root/annotations/``
    exist. Raises ``UserError`` on a network error, an HTTP error, a size or md5
    mismatch, a corrupt or unsafe archive, or a ``root`` that cannot be written.

    Example:
        >>> import hashlib, io, tempfile
        >>> here = Path(tempfile.mkdtemp())  # a mirror of the two archives, each holding one file
        >>> archives = {}
        >>> for folder in ("images", "annotations"):
        ...     with tarfile.open(here / f"{folder}.tar.gz", "w:gz") as tar:
        ...         member = tarfile.TarInfo(f"{folder}/README")
        ...         member.size = 2
        ...         tar.addfile(member, io.BytesIO(b"hi"))
        ...     data = (here / f"{folder}.tar.gz").read_bytes()
        ...     archives[f"{folder}.tar.gz"] = (hashlib.md5(data).hexdigest(), len(data))
        >>> root = download_oxford_pets(here / "pets", here.as_uri() + "/", archives, progress=False)
        >>> sorted(p.name for p in root.iterdir())
        ['annotations', 'annotations.tar.gz', 'images', 'images.tar.gz']
    """
    return download("oxford-pets", root, base_url, archives, progress)


def _download_verified(url: str, path: Path, expected_md5: str, size: int, progress: bool) -> None:
    """Stream ``url`` to ``path``.part, then rename it to ``path`` if its size and md5 match. The .part file is
    removed however this ends, an interruption included."""
    part = path.with_name(path.name + ".part")
    try:
        got_md5 = _stream(url, part, size, progress)
        if got_md5 != expected_md5:
            raise UserError(f"md5 mismatch for {path.name} from {url}: expected {expected_md5}, got {got_md5} "
                            "(the file was removed; try again)")
        try:
            os.replace(part, path)
        except OSError as exc:
            raise UserError(f"cannot move {part} to {path}: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if progress:
        print(f"{path.name}: {size / 1e6:.1f} MB, md5 ok", file=sys.stderr)


def _stream(url: str, part: Path, size: int, progress: bool) -> str:
    """Write the ``size`` bytes ``url`` should send to ``part`` (made anew, never through a link); their md5.
    A body longer or shorter than ``size`` is refused: an endless one is cut off after ``size`` bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    next_report = _PROGRESS_EVERY_BYTES
    try:
        part.unlink(missing_ok=True)
        with open(part, "xb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            while chunk := response.read(min(_CHUNK_BYTES, size + 1 - done)):
                done += len(chunk)
                if done > size:
                    raise UserError(f"{url} sent more than the {size} bytes of {part.stem}: stopped there and removed "
                                    f"{part} (a wrong mirror? try another --url)")
                out.write(chunk)
                digest.update(chunk)
                if progress and done >= next_report:
                    print(f"{part.stem}: {done / 1e6:.0f} MB", file=sys.stderr)
                    next_report += _PROGRESS_EVERY_BYTES
    except urllib.error.HTTPError as exc:
        raise UserError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UserError(f"download of {url} failed: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(f"download of {url} to {part} failed: {str(exc) or type(exc).__name__}") from exc
    if done < size:
        raise UserError(f"download of {url} ended after {done} of the {size} bytes of {part.stem} "
                        "(the file was removed; try again)")
    return digest.hexdigest()


def _extract_all(paths: list[Path], root: Path) -> None:
    """Check every member of every archive, then extract them all into ``root``."""
    with ExitStack() as stack:
        opened = []
        for path in paths:
            try:
                tar = stack.enter_context(tarfile.open(path, "r:gz"))
                members = tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise UserError(f"cannot read archive {path}: {exc}") from exc
            for member in members:
                _check_member(member, path, root)
            opened.append((path, tar, members))

        for path, tar, members in opened:
            try:
                tar.extractall(root, members=members, filter="data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise UserError(f"cannot extract archive {path} into {root}: {exc}") from exc


def _check_member(member: tarfile.TarInfo, archive: Path, root: Path) -> None:
    """Refuse a member whose path, or link target, would land outside ``root``."""
    root = root.resolve()
    where = f"unsafe member {member.name!r} in {archive}"
    if os.path.isabs(member.name) or ".." in Path(member.name).parts:
        raise UserError(f"{where}: absolute path or '..' component; refusing to extract")
    if member.issym() or member.islnk():
        if os.path.isabs(member.linkname):
            raise UserError(f"{where}: link to absolute path {member.linkname!r}; refusing to extract")
        # A symlink's target is relative to its own folder, a hard link's to the archive root.
        link_dir = (root / member.name).parent if member.issym() else root
        target = Path(os.path.normpath(link_dir / member.linkname))
        if not target.is_relative_to(root):
            raise UserError(f"{where}: link to {member.linkname!r} points outside {root}; refusing to extract")


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
