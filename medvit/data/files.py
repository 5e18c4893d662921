"""Which files are images: one suffix list and one magic-byte sniffer for the reader, batch predict and the worklist.

The format is always decided from the content (`sniff_format`); a suffix only says which files in a folder
are worth opening. PACS exports often have no extension at all, so an extension-less file is listed when
its first bytes are an image's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg"})
SNIFF_BYTES = 132  # DICOM's 128-byte preamble + "DICM"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(head: bytes) -> str | None:
    """"dicom", "png" or "jpeg" from a file's first `SNIFF_BYTES` bytes (or all of them), else None."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM dataset written without the preamble and "DICM" (it starts with group 0002 or 0008).

    Only a weak guess: the reader tries it on content it was handed, but folders are never searched with it.
    """
    return head[:2] in (b"\x02\x00", b"\x08\x00")


def sniff_file(path: Path) -> str | None:
    """`sniff_format` of a file's first bytes.

    Raises:
        OSError: the file cannot be read.
    """
    with path.open("rb") as f:
        return sniff_format(f.read(SNIFF_BYTES))


def _is_candidate(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        return sniff_file(path) is not None
    except OSError:
        return False


def image_files(folder: Path, *, recursive: bool) -> Iterator[Path]:
    """Files in `folder` (sorted by path) with an image suffix, or with no suffix and an image's magic bytes."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return (p for p in sorted(entries) if p.is_file() and _is_candidate(p))


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly (any name) plus images found recursively in folders, absolute and de-duplicated.

    A missing path is kept, so batch predict turns it into an error row instead of letting it vanish.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser().absolute()
        if path.is_dir():
            found.update(dict.fromkeys(image_files(path, recursive=True)))
        else:
            found[path] = None
    return list(found)
