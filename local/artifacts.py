"""``model.tar.gz`` as SageMaker makes it, and extraction that cannot escape its folder.

Packing: the *contents* of /opt/ml/model at the archive's top level (``model.json``, not
``model/model.json``), as SageMaker uploads them and unpacks them into /opt/ml/model of an endpoint.
Owners are reset to root: the archive should not depend on who ran the job, or in which mode.
The gzip stream is written at level 0 (stored): float weights are noise to deflate. Measured on the
lite model's 52 MB here: level 1 saves 7 % and takes 1.3-2.7 s, level 0 takes 0.12 s, and the
inner loop has a 1 s budget for everything the harness adds. Any gzip reader reads it.

Extraction: a model archive is input from elsewhere. Every member is checked before anything is
written, with Python's ``data`` filter (refuses members that would land outside the folder, links
that leave it, device files and FIFOs; clears setuid bits) plus a refusal of absolute names, which
the filter would otherwise quietly make relative.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path, PurePosixPath

from local.errors import UnsafeArchiveError

log = logging.getLogger(__name__)

COMPRESSLEVEL = 0


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def pack_dir(src: Path, archive: Path) -> Path:
    """Tar+gzip the contents of ``src`` into ``archive`` (members relative to ``src``, sorted)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz", compresslevel=COMPRESSLEVEL) as tar:
        for entry in sorted(src.iterdir()):
            tar.add(entry, arcname=entry.name, filter=_owned_by_root)
    partial.replace(archive)  # a reader never sees half an archive
    log.info("packed %s -> %s (%.1f MB)", src, archive, archive.stat().st_size / 1e6)
    return archive


def check_members(tar: tarfile.TarFile, dest: Path) -> None:
    """Raise :class:`UnsafeArchiveError` for the first member that is not a plain, contained entry."""
    for member in tar.getmembers():
        if PurePosixPath(member.name).is_absolute() or member.name.startswith("\\"):
            raise UnsafeArchiveError(f"refusing archive member with an absolute path: {member.name!r}")
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"refusing archive member {member.name!r}: {exc}") from None


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` (tar, maybe gzipped) into ``dest``; nothing is written if a member is unsafe."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            check_members(tar, dest)
            tar.extractall(dest, filter="data")
    except tarfile.ReadError as exc:
        raise UnsafeArchiveError(f"{archive} is not a readable tar archive: {exc}") from None
    return dest


def member_names(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        return sorted(m.name for m in tar.getmembers())
