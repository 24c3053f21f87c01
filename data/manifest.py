"""The store's file manifest: every file a build wrote, with its size, so a store that lost files on the way
(an interrupted copy or sync, a deleted chunk) is refused by name instead of read as zeros.

zarr reads a missing chunk file as its fill value without an error, and it skips writing chunks that are
all fill value, so a lost file cannot be told from an all-zero chunk by looking at the arrays alone: a lost
``mask_atac`` chunk would silently make those cells RNA-only, a lost ``batch`` chunk move them to batch 0.
The builder lists what it wrote (``StoreWriter.close``, every build path) and the loader checks the list
once per opened store (``Store.verify_files``, a ``stat`` per file: ~500 files for a 1M-cell store). Stores built before the manifest
existed have none and are read as before (with the count arrays' own check, ``Store.check_csr``).
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
    if lost or changed:
        what = "; ".join([f"{len(lost)} missing, e.g. {lost[:3]}"] * bool(lost)
                         + [f"{len(changed)} of another size than built (truncated?), e.g. {changed[:3]}"] * bool(changed))
        raise StoreReadError(f"{root}: files of the store are not as built ({what}): an interrupted copy or a "
                             "lost file; rebuild or restore the store")
    return True
