"""Where an ImageNet-layout folder keeps its images, labels and class names (for ``make_shards``).

Labels are the positions of the wnids in the sorted list of ``train/`` folders. A flat ``val/``
is labelled through the devkit: ``ILSVRC2012_validation_ground_truth.txt`` numbers classes from 1
in the devkit's own order, which ``meta.mat`` maps to wnids (docs/paper.md, "Labels").
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from distalex.data.info import DataError

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def list_classes(src: Path) -> list[str]:
    train = src / "train"
    if not train.is_dir():
        raise DataError(f"{train}: missing (expected train/<wnid>/*.JPEG)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train}: no class folders")
    return classes


def list_train(src: Path, classes: list[str]) -> list[tuple[str, int]]:
    items, empty = [], []
    for label, wnid in enumerate(classes):
        files = _images(src / "train" / wnid)
        if not files:
            empty.append(wnid)
        items += [(str(f), label) for f in files]
    if empty:
        raise DataError(f"{src / 'train'}: empty class folder(s): {empty[:10]}")
    return items


def _devkit_file(devkit: Path, name: str) -> Path | None:
    return next((d / name for d in (devkit, devkit / "data") if (d / name).is_file()), None)


def _leaf_synsets(meta: Path) -> list:
    """meta.mat's synsets of the 1000 classes (the rest are their WordNet ancestors)."""
    import scipy.io

    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    return [s for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0]


def read_devkit(devkit: Path) -> list[str]:
    """wnid of each validation image, in the devkit's order (line i <-> ILSVRC2012_val_{i:08d})."""
    gt, meta = _devkit_file(devkit, GROUND_TRUTH), _devkit_file(devkit, META)
    if gt is None or meta is None:
        raise DataError(f"{devkit}: needs {GROUND_TRUTH} and {META} (in it or in its data/ folder)")
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in _leaf_synsets(meta)}
    wnids = []
    for n, line in enumerate(gt.read_text().split(), 1):
        if int(line) not in id_to_wnid:
            raise DataError(f"{gt}:{n}: class id {line} not among the leaf synsets of {meta}")
        wnids.append(id_to_wnid[int(line)])
    return wnids


def _find_devkit(src: Path, devkit: str | None) -> Path | None:
    if devkit:
        return Path(devkit)
    for d in (src / "ILSVRC2012_devkit_t12", src / "devkit", src / "val"):
        if (d / GROUND_TRUTH).is_file() or (d / "data" / GROUND_TRUTH).is_file():
            return d
    return None


def read_synset_mapping(path: Path) -> list[tuple[str, str]]:
    """(id, readable name) of each line ``<id> <name>`` (ImageNet's LOC_synset_mapping.txt), in file
    order; the id stands for the name where none follows it."""
    pairs = []
    for line in path.read_text().splitlines():
        parts = line.split(maxsplit=1)
        if parts:
            pairs.append((parts[0], parts[1].strip() if len(parts) > 1 else parts[0]))
    return pairs


def class_names(src: Path, classes: list[str], devkit: str | None, mapping: str | None = None) -> list[str]:
    """A readable name per class: ``mapping`` or SRC/LOC_synset_mapping.txt (``<wnid> <name>`` lines),
    else the devkit's meta.mat words, else the class ids. A class the source does not name keeps its id."""
    path = Path(mapping) if mapping else src / SYNSET_MAPPING
    if mapping and not path.is_file():
        raise DataError(f"--class-names {path}: no such file")
    names: dict[str, str] = {}
    if path.is_file():
        names = dict(read_synset_mapping(path))
    else:
        kit = _find_devkit(src, devkit)
        meta = _devkit_file(kit, META) if kit is not None else None
        if meta is not None:
            names = {str(s["WNID"]): str(s["words"]) for s in _leaf_synsets(meta)}
    return [names.get(c, c) for c in classes]


def list_val(src: Path, classes: list[str], devkit: str | None) -> list[tuple[str, int]]:
    val = src / "val"
    if not val.is_dir():
        raise DataError(f"{val}: missing (expected val/<wnid>/ folders, or flat val/ with the devkit)")
    index = {w: i for i, w in enumerate(classes)}
    folders = sorted(p for p in val.iterdir() if p.is_dir())
    if folders:
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise DataError(f"{val}: class folder(s) not in train/: {unknown[:10]}")
        items, empty = [], []
        for p in folders:
            files = _images(p)
            if not files:
                empty.append(p.name)
            items += [(str(f), index[p.name]) for f in files]
        if empty:
            raise DataError(f"{val}: empty class folder(s): {empty[:10]}")
        return items
    files = [f for f in _images(val) if f.name not in (GROUND_TRUTH, META)]
    if not files:
        raise DataError(f"{val}: no images")
    kit = _find_devkit(src, devkit)
    if kit is None:
        raise DataError(f"{val} is flat ({len(files)} files) but no devkit was found: pass --devkit DIR")
    wnids = read_devkit(kit)
    items = []
    for pos, f in enumerate(files):
        m = re.search(r"(\d+)$", f.stem)  # ILSVRC2012_val_00000042 -> line 42 of the ground truth
        n = int(m.group(1)) if m else pos + 1
        if not 1 <= n <= len(wnids):
            raise DataError(f"{f}: number {n} outside the ground truth's 1..{len(wnids)}")
        if wnids[n - 1] not in index:
            raise DataError(f"{f}: ground truth {wnids[n - 1]} is not a train/ class")
        items.append((str(f), index[wnids[n - 1]]))
    return items
