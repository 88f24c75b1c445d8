"""Image ids read from list files become file names: refuse every id that could name another path.

Split lists (VOC's ImageSets/Segmentation/*.txt, SBD's train.txt / val.txt), the PASCAL in Detail
annotation file and the prepared manifest hand over image ids that are joined to folders
(`JPEGImages/<id>.jpg`, `<out>/labels/<split>/<id>.png`). An id holding `..`, a path separator or a
NUL, or one that is empty or absolute, would read or write outside those folders, so it is refused
with one error that names the list file, each bad line (or row) and the fix.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CascadeError

MAX_LISTED = 20  # bad ids shown in full in one error message


class UnsafeIdError(CascadeError, ValueError):
    """Image ids in a list file that cannot be used as file names."""


def id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be a file name inside a dataset folder (None when it can)."""
    if not image_id.strip() or image_id == ".":
        return "is empty"
    if "\0" in image_id:
        return "contains a NUL character"
    if image_id.startswith(("/", "\\")) or image_id[1:2] == ":":
        return "is an absolute path"
    if image_id == "..":
        return "is '..'"
    if "/" in image_id or "\\" in image_id:
        return "contains a path separator"
    return None


def path_problem(path: str) -> str | None:
    """Why `path`, relative with '/' between its parts (`labels/train/x.png`), could leave its root."""
    if path.startswith(("/", "\\")) or path[1:2] == ":":
        return "is an absolute path"
    for part in path.split("/"):
        if problem := id_problem(part):
            return f"has a part {part!r} that {problem}"
    return None


def unsafe_ids_error(source: str | Path, bad: list[str], fix: str) -> UnsafeIdError:
    """One error for every bad id of `source`; `bad` holds "<line or row>: <id> <problem>" lines."""
    shown = "\n".join(f"  - {b}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return UnsafeIdError(
        f"{source}: {len(bad)} image id(s) that cannot be file names (no '..', path separators, NUL characters, "
        f"empty or absolute names):\n{shown}{more}\n{fix}"
    )
