"""Turn a user's PATH (folder, MONAI datalist JSON, or one image) into the list of images / items to read."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from medssl.data import keys
from medssl.data.readers import SUPPORTED_EXTENSIONS, dicom_series_ids, image_extension, is_dicom_file
from medssl.errors import InputError

log = logging.getLogger(__name__)

DATALIST_SECTIONS = ("training", "validation", "test")
#: a folder holding this file (as ``medssl data demo`` writes): its images below the folder that the datalist names
#: as a ``label`` are label maps, not images, and are left out
FOLDER_DATALIST = "datalist.json"
_PATH_KEYS = (keys.IMAGE, keys.LABEL)


def _scan_folder(folder: Path) -> list[Path]:
    """Every image below ``folder`` (hidden entries skipped); a folder holding a DICOM series is one image."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        root_path = Path(root)
        visible = [root_path / name for name in sorted(files) if not name.startswith(".")]
        in_series: set[Path] = set()
        if any(is_dicom_file(f) for f in visible):
            series = dicom_series_ids(root_path)
            if len(series) > 1:
                raise InputError(f"folder holds {len(series)} DICOM series; put each series in its own folder",
                                 path=root_path)
            if series:
                found.append(root_path)
                in_series = {f for f in visible if is_dicom_file(f)}
        found.extend(f for f in visible if f not in in_series and image_extension(f) is not None)
    if not found:
        raise InputError(f"folder holds no images (supported: {', '.join(SUPPORTED_EXTENSIONS)} "
                         "or DICOM series folders)", path=folder)
    return sorted(found)


def _absolute(base: Path, value: str) -> Path:
    """``value`` relative to ``base`` (absolute values kept), normalised without resolving symlinks."""
    return Path(os.path.normpath(base / Path(value).expanduser()))


def read_datalist(path: str | Path) -> dict[str, list[dict[str, Path]]]:
    """Sections (``training``, ``validation``, ``test``) of a MONAI datalist JSON -> items ``{"image", "label"?}``.

    Paths are made absolute relative to the JSON file and must exist; a section may also list bare image paths
    (the Decathlon ``test`` style). Keys other than ``image``/``label`` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such datalist file; check the path", path=path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"not a valid JSON datalist: {error}", path=path) from None
    if not isinstance(content, dict) or not any(isinstance(content.get(s), list) for s in DATALIST_SECTIONS):
        raise InputError(f"a datalist needs at least one list among {', '.join(DATALIST_SECTIONS)}", path=path)
    base = path.absolute().parent
    sections: dict[str, list[dict[str, Path]]] = {}
    for section in DATALIST_SECTIONS:
        entries = content.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InputError(f"'{section}' must be a list of items", path=path)
        sections[section] = [_datalist_item(entry, f"{section}[{index}]", base, path)
                             for index, entry in enumerate(entries)]
    if not any(sections.values()):
        raise InputError("the datalist lists no images", path=path)
    return sections


def _datalist_item(entry: object, where: str, base: Path, json_path: Path) -> dict[str, Path]:
    """One datalist entry (a dict or a bare image path) with absolute, existing paths."""
    entry = {keys.IMAGE: entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict) or not isinstance(entry.get(keys.IMAGE), str):
        raise InputError(f"entry {where} needs an 'image' path (a string), got {entry!r}", path=json_path)
    item: dict[str, Path] = {}
    for key in _PATH_KEYS:
        if key not in entry:
            continue
        if not isinstance(entry[key], str):
            raise InputError(f"entry {where} '{key}' must be one path (a string), got {entry[key]!r}", path=json_path)
        resolved = _absolute(base, entry[key])
        if not resolved.exists():
            raise InputError(f"entry {where} '{key}': '{entry[key]}' points to no file ({resolved})", path=json_path)
        item[key] = resolved
    return item


def resolve_items(path: str | Path) -> list[dict[str, Path]]:
    """Items ``{"image": ..., "label"?: ...}`` of any PATH form: datalist JSON (all sections, in order),
    folder (every image below it, sorted, less the label maps its own ``datalist.json`` names) or a single image
    file / DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder; pass an image, a folder of images or a datalist JSON", path=path)
    if path.is_file() and path.suffix.lower() == ".json":
        return [item for items in read_datalist(path).values() for item in items]
    if path.is_dir():
        return [{keys.IMAGE: image} for image in _without_label_maps(path, _scan_folder(path))]
    if image_extension(path) is None:
        raise InputError(f"not an image: unknown extension '{''.join(path.suffixes) or path.name}'; supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}, a folder or a datalist .json", path=path)
    return [{keys.IMAGE: path}]


def _without_label_maps(folder: Path, images: list[Path]) -> list[Path]:
    """``images`` less the label maps named by the folder's own ``datalist.json`` (logged), if it has one."""
    datalist = folder / FOLDER_DATALIST
    if not datalist.is_file():
        return images
    try:
        sections = read_datalist(datalist)
    except InputError as error:
        log.warning("%s; reading every image below %s (label maps included)", error, folder)
        return images
    labels = {Path(os.path.abspath(item[keys.LABEL])) for items in sections.values() for item in items
              if keys.LABEL in item}
    kept = [image for image in images if Path(os.path.abspath(image)) not in labels]
    if len(kept) < len(images):
        log.info("%s: %d label map(s) named by its %s left out; %d image(s) read", folder, len(images) - len(kept),
                 FOLDER_DATALIST, len(kept))
    if not kept:
        raise InputError(f"every image below this folder is a label map of its {FOLDER_DATALIST}; pass the image "
                         "folder or the datalist", path=folder)
    return kept


def resolve_images(path: str | Path) -> list[Path]:
    """The image paths of any PATH form (see ``resolve_items``)."""
    return [item[keys.IMAGE] for item in resolve_items(path)]
