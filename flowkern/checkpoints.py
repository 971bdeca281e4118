"""Checkpoints that survive a kill at any point.

A checkpoint directory (`checkpoint-N`, written by the Hugging Face Trainer) counts as
complete only once `flowkern_complete.json` lists every file in it with its size: the
manifest is written last, atomically (temporary file, fsync, rename).  Rotation deletes a
manifest before the files it lists, so a kill in the middle of a save or of a deletion
leaves a directory that is recognisably incomplete.  Resuming takes the newest complete
checkpoint and removes the incomplete ones.
"""

import json
import os
import re
import shutil

MANIFEST = "flowkern_complete.json"
_NAME = re.compile(r"checkpoint-(\d+)$")


def mark_complete(directory: str) -> None:
    """Write the manifest of `directory` (every file and its size), atomically."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, directory)] = os.path.getsize(path)
    files.pop(MANIFEST, None)
    staging = os.path.join(directory, MANIFEST + ".tmp")
    with open(staging, "w") as f:
        json.dump(files, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, os.path.join(directory, MANIFEST))
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_complete(directory: str) -> bool:
    """Whether `directory` has a manifest and every file it lists, at its size."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            files = json.load(f)
        return all(os.path.getsize(os.path.join(directory, name)) == size for name, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False


def checkpoints(output_dir: str) -> list:
    """The `checkpoint-N` directories under `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [path for _, path in sorted(found)]


def last_complete(output_dir: str):
    """The newest complete checkpoint under `output_dir`, or None."""
    return next((path for path in reversed(checkpoints(output_dir)) if is_complete(path)), None)


def remove_incomplete(output_dir: str) -> list:
    """Delete the incomplete checkpoints under `output_dir`; returns their paths."""
    removed = [path for path in checkpoints(output_dir) if not is_complete(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def rotate(output_dir: str, limit, keep=None) -> None:
    """Keep the `limit` newest complete checkpoints (and `keep`, the best one): older ones
    lose their manifest first, then their files."""
    if not limit or limit <= 0:
        return
    complete = [path for path in checkpoints(output_dir) if is_complete(path)]
    protected = set(complete[-limit:]) | ({os.path.normpath(keep)} if keep else set())
    for path in complete[:-limit]:
        if os.path.normpath(path) not in protected:
            os.remove(os.path.join(path, MANIFEST))
            shutil.rmtree(path, ignore_errors=True)
