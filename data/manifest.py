"""The store's file manifest: every file a build wrote, with its size, so a store that lost files on the way
(an interrupted copy or sync, a deleted chunk) is refused by name instead of read as zeros.

zarr reads a missing chunk file as its fill value without an error, and it skips writing chunks that are
all fill value, so a lost file cannot be told from an all-zero chunk by looking at the arrays alone: a lost
``mask_atac`` chunk would silently make those cells RNA-only, a lost ``batch`` chunk move them to batch 0.
The builder lists what it wrote (``StoreWriter.close``, every build path) and the loader checks the list
once per opened store (``Store.verify_files``, a ``stat`` per file: ~500 files for a 1M-cell store), and refuses
chunk files it does not list (another store copied over this one: where the new build wrote no all-zero chunk,
the old store's file would be read). Stores built before the manifest existed have none and are read as before
(with the count arrays' own check, ``Store.check_csr``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data.store import StoreReadError

MANIFEST = "mva_manifest.json"
# rewritten after the manifest (the root attributes, ``complete: true`` last), or the manifest itself
_UNLISTED = {"zarr.json", MANIFEST}


def write_manifest(root: str | os.PathLike) -> None:
    """List every file under ``root`` (relative path -> size in bytes) into ``root/mva_manifest.json``."""
    root = Path(root)
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in _UNLISTED:
                files[rel] = path.stat().st_size
    (root / MANIFEST).write_text(json.dumps({"files": dict(sorted(files.items()))}))


def manifest_digest(root: str | os.PathLike) -> str:
    """A short digest of the manifest (every file and its size): two copies of one build agree, another build
    almost surely not; "" for a store without a manifest."""
    try:
        return hashlib.blake2b((Path(root) / MANIFEST).read_bytes(), digest_size=16).hexdigest()
    except FileNotFoundError:
        return ""


def verify_manifest(root: str | os.PathLike) -> bool:
    """Raise :class:`StoreReadError` naming the files of the manifest that are missing or changed size;
    True when every listed file is there, False for a store built without a manifest."""
    root = Path(root)
    try:
        listed = json.loads((root / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return False  # built before manifests were written
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreReadError(f"{root / MANIFEST} is damaged ({exc}): rebuild or restore the store") from None
    lost, changed = [], []
    for rel, size in listed.items():
        try:
            if os.stat(root / rel).st_size != size:
                changed.append(rel)
        except FileNotFoundError:
            lost.append(rel)
    stale = _unlisted_chunks(root, listed)
    if lost or changed or stale:
        what = "; ".join([f"{len(lost)} missing, e.g. {lost[:3]}"] * bool(lost)
                         + [f"{len(changed)} of another size than built (truncated?), e.g. {changed[:3]}"] * bool(changed)
                         + [(f"{len(stale)} chunk files not written by this build, e.g. {stale[:3]} (another "
                             "store copied over this one without deleting it first?)")] * bool(stale))
        raise StoreReadError(f"{root}: files of the store are not as built ({what}): an interrupted copy or a "
                             "lost file; rebuild or restore the store")
    return True


def _unlisted_chunks(root: Path, listed: dict[str, int]) -> list[str]:
    """Chunk files (zarr v3 keys ``<array>/c/...``) under ``root`` that the manifest does not list.

    ``cp -r new/. old/`` or ``rsync`` without ``--delete`` keeps the old store's files that the new build did not
    write, and zarr writes no file for an all-zero chunk: where the new store has one (an RNA-only shard's
    ``mask_atac``) the old store's file was read instead of zeros, with every listed file present at its size."""
    out = []
    for dirpath, _, names in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # hidden dirs are never read (a late Dask task's .staging shard: data/dask_build.py)
        if "c" in rel_dir.parts and not any(part.startswith(".") for part in rel_dir.parts):
            out += [rel for rel in ((rel_dir / name).as_posix() for name in names) if rel not in listed]
    return sorted(out)
