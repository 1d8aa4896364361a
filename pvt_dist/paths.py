"""Relative paths read from files (manifests, COCO JSON, archives) must stay inside the folder they are
joined to: a crafted name must not read or write elsewhere. No imports beyond the standard library."""

from __future__ import annotations

import os


def stays_inside(name: str) -> bool:
    """True if the relative path ``name`` (a manifest's shard, a COCO file_name, a tar member) cannot leave
    the folder it is joined to: not absolute, no ``..`` component."""
    return bool(name) and not os.path.isabs(name) and ".." not in name.replace("\\", "/").split("/")
