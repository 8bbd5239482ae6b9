"""Reader for referring-expression datasets in the REFER layout (RefCOCO, RefCOCO+, RefCOCOg, ReferItGame).

Layout::

    <refer_root>/<dataset>/refs(<split_by>).p    pickled list of refs (Python 2 pickle)
    <refer_root>/<dataset>/instances.json        COCO images / annotations / categories
    <image_root>/<images[].file_name>            COCO train2014 (RefCOCO family) or saiapr_tc-12 (refclef)

A ref names one annotated object (``ann_id``) in one image and carries one or more sentences; the reader
yields one :class:`ReferExpression` per sentence. Refs that cannot be used (unknown annotation or image, an
image path that escapes the image root, no text) become :class:`ReferProblem` entries instead of records,
so that a caller can count and list them; nothing is dropped silently.

NOTE: a ref's own ``file_name`` (``COCO_train2014_000000581857_16.jpg``) is *not* an image file: REFER
appends the annotation id. The image file is ``instances.json``'s ``images[].file_name``.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pipelines.runtime import gc_paused
from vglaw import safe_pickle

__all__ = [
    "REFER_SPLIT_BYS",
    "ReferDataset",
    "ReferExpression",
    "ReferFormatError",
    "ReferImage",
    "ReferProblem",
    "ReferSource",
    "UnsafeImagePathError",
    "resolve_image_path",
]

# Datasets and the splitBy variants this reader accepts ("synthetic" is the built-in generated dataset).
REFER_SPLIT_BYS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc", "google"),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "synthetic": ("unc",),
}


class ReferFormatError(ValueError):
    """Raised when a REFER file is not in the expected format as a whole."""


class UnsafeImagePathError(ValueError):
    """Raised for an image file name that is absolute or would leave the image root."""


@dataclass(frozen=True)
class ReferSource:
    """Where a REFER dataset lives.

    Attributes:
        refer_root: Folder holding ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        dataset: One of :data:`REFER_SPLIT_BYS`.
        split_by: The split variant, e.g. ``unc`` or ``umd``.
        image_root: Folder that ``instances.json``'s ``images[].file_name`` are relative to.
    """

    refer_root: Path
    dataset: str
    split_by: str
    image_root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "refer_root", Path(self.refer_root))
        object.__setattr__(self, "image_root", Path(self.image_root))
        if self.dataset not in REFER_SPLIT_BYS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(REFER_SPLIT_BYS)}")
        if self.split_by not in REFER_SPLIT_BYS[self.dataset]:
            raise ValueError(
                f"dataset {self.dataset!r} has no split_by {self.split_by!r}; "
                f"expected one of {list(REFER_SPLIT_BYS[self.dataset])}"
            )

    @property
    def refs_path(self) -> Path:
        """Path of the pickled refs."""
        return self.refer_root / self.dataset / f"refs({self.split_by}).p"

    @property
    def instances_path(self) -> Path:
        """Path of the COCO-style ``instances.json``."""
        return self.refer_root / self.dataset / "instances.json"


@dataclass(frozen=True)
class ReferImage:
    """One image as ``instances.json`` describes it."""

    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ReferExpression:
    """One referring expression (a sentence of a ref) with everything needed to build a training row.

    Attributes:
        ref_id: The ref this sentence belongs to.
        ann_id: The referred object's annotation id in ``instances.json``.
        image_id: The image's id.
        sent_id: The sentence id (unique within a dataset).
        split: ``train``, ``val``, ``testA``, ...
        expression: The raw sentence as written by the annotator.
        category_id: COCO category of the object.
        image: The image record.
        box_xywh: COCO box ``[x, y, w, h]`` in original pixels.
        segmentation: The COCO segmentation exactly as in ``instances.json`` (polygons or RLE).
        iscrowd: Whether the annotation is a crowd (RLE) annotation.
    """

    ref_id: int
    ann_id: int
    image_id: int
    sent_id: int
    split: str
    expression: str
    category_id: int
    image: ReferImage
    box_xywh: tuple[float, float, float, float]
    segmentation: Any = field(compare=False, repr=False)
    iscrowd: bool = False


@dataclass(frozen=True)
class ReferProblem:
    """A ref (or part of one) that cannot become records, and why."""

    reason: str
    split: str | None = None
    ref_id: int | None = None
    ann_id: int | None = None
    image_id: int | None = None
    file_name: str | None = None
    sent_ids: tuple[int, ...] = ()

    @property
    def expressions_lost(self) -> int:
        """How many expressions this problem removes from the output."""
        return len(self.sent_ids)


def resolve_image_path(image_root: str | os.PathLike[str], file_name: str) -> Path:
    """Joins ``file_name`` to ``image_root``, refusing names that could leave the root.

    Raises:
        UnsafeImagePathError: For an empty, absolute or drive-qualified name, or one with ``..`` parts.
    """
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
        raise UnsafeImagePathError(f"invalid image file name {file_name!r}")
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file_name).drive or PureWindowsPath(file_name).root:
        raise UnsafeImagePathError(f"image file name {file_name!r} is absolute")
    if ".." in posix.parts or posixpath.normpath(str(posix)).startswith(".."):
        raise UnsafeImagePathError(f"image file name {file_name!r} escapes the image root")
    return Path(image_root).joinpath(*posix.parts)


@functools.lru_cache(maxsize=1 << 16)
def _unsafe_name(file_name: str) -> str | None:
    """Why an image file name is unsafe, or None; cached, since many refs share an image."""
    try:
        resolve_image_path(".", file_name)
    except UnsafeImagePathError as err:
        return str(err)
    return None


def _text(value: Any) -> str | None:
    """Returns sentence text as proper unicode.

    REFER's pickles come from Python 2; a byte string holding UTF-8 arrives (with ``encoding="latin1"``)
    as mojibake such as ``cafÃ©``. Such strings are re-decoded; genuine Latin-1 text is not valid UTF-8 and
    stays as it is.
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin1")
    if not isinstance(value, str):
        return None
    try:
        return value.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return int(value)


class ReferDataset:
    """A loaded REFER dataset: images, annotations, and the refs turned into per-sentence records.

    Build it with :meth:`load`. ``expressions`` holds the usable records in file order and ``problems``
    everything that was refused, with reasons.
    """

    def __init__(
        self,
        source: ReferSource,
        images: dict[int, ReferImage],
        expressions: list[ReferExpression],
        problems: list[ReferProblem],
    ) -> None:
        self.source = source
        self.images = images
        self.expressions = expressions
        self.problems = problems

    @classmethod
    def load(cls, source: ReferSource) -> ReferDataset:
        """Reads ``refs(<split_by>).p`` (with the restricted unpickler) and ``instances.json``.

        Raises:
            FileNotFoundError: If either file is missing.
            vglaw.safe_pickle.UnsafePickleError: If the pickle references any non-container global.
            ReferFormatError: If a file's top-level structure is wrong.
        """
        with gc_paused():
            return cls._load(source)

    @classmethod
    def _load(cls, source: ReferSource) -> ReferDataset:
        refs = safe_pickle.load(source.refs_path)
        if not isinstance(refs, list):
            kind = type(refs).__name__
            raise ReferFormatError(f"{source.refs_path} holds a {kind}, expected a list of refs")
        with open(source.instances_path, encoding="utf-8") as f:
            instances = json.load(f)
        if not isinstance(instances, dict) or not {"images", "annotations"} <= instances.keys():
            raise ReferFormatError(f"{source.instances_path} lacks 'images' or 'annotations'")
        images: dict[int, ReferImage] = {}
        for img in instances["images"]:
            images[int(img["id"])] = ReferImage(
                image_id=int(img["id"]),
                file_name=str(img["file_name"]),
                width=int(img["width"]),
                height=int(img["height"]),
            )
        annotations = {int(ann["id"]): ann for ann in instances["annotations"]}
        expressions: list[ReferExpression] = []
        problems: list[ReferProblem] = []
        for i, ref in enumerate(refs):
            _convert_ref(i, ref, source, images, annotations, expressions, problems)
        return cls(source, images, expressions, problems)

    def __iter__(self) -> Iterator[ReferExpression]:
        return iter(self.expressions)

    def __len__(self) -> int:
        return len(self.expressions)

    @property
    def splits(self) -> list[str]:
        """The splits present, in first-seen order."""
        return list(dict.fromkeys(e.split for e in self.expressions))


def _convert_ref(
    index: int,
    ref: Any,
    source: ReferSource,
    images: dict[int, ReferImage],
    annotations: dict[int, dict[str, Any]],
    expressions: list[ReferExpression],
    problems: list[ReferProblem],
) -> None:
    """Appends the records of one ref to ``expressions``, or what went wrong to ``problems``."""
    if not isinstance(ref, dict):
        problems.append(ReferProblem(reason=f"ref #{index} is a {type(ref).__name__}, not a dict"))
        return
    ref_id, ann_id, image_id = (_as_int(ref.get(k)) for k in ("ref_id", "ann_id", "image_id"))
    split = ref.get("split") if isinstance(ref.get("split"), str) else None
    sentences = ref.get("sentences") if isinstance(ref.get("sentences"), list) else []
    sent_ids = tuple(
        int(s["sent_id"]) for s in sentences if isinstance(s, dict) and _as_int(s.get("sent_id")) is not None
    )

    def refuse(reason: str, file_name: str | None = None) -> None:
        problems.append(ReferProblem(reason, split, ref_id, ann_id, image_id, file_name, sent_ids))

    if ref_id is None or ann_id is None or image_id is None or split is None:
        refuse(f"ref #{index} lacks an integer ref_id/ann_id/image_id or a split")
        return
    if not sentences or len(sent_ids) != len(sentences):
        refuse("ref has no sentences, or a sentence without an integer sent_id")
        return
    image = images.get(image_id)
    if image is None:
        refuse(f"image_id {image_id} is not in instances.json")
        return
    unsafe = _unsafe_name(image.file_name)
    if unsafe is not None:
        refuse(unsafe, image.file_name)
        return
    ann = annotations.get(ann_id)
    if ann is None:
        refuse(f"ann_id {ann_id} is not in instances.json", image.file_name)
        return
    if int(ann.get("image_id", -1)) != image_id:
        refuse(f"ann_id {ann_id} belongs to image {ann.get('image_id')}, not {image_id}", image.file_name)
        return
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        refuse(f"ann_id {ann_id} has no valid bbox", image.file_name)
        return
    if "segmentation" not in ann:
        refuse(f"ann_id {ann_id} has no segmentation", image.file_name)
        return
    for sentence in sentences:
        text = _text(sentence.get("raw")) or _text(sentence.get("sent"))
        if text is None:
            lost = (int(sentence["sent_id"]),)
            name = image.file_name
            problems.append(ReferProblem("sentence has no text", split, ref_id, ann_id, image_id, name, lost))
            continue
        expressions.append(
            ReferExpression(
                ref_id=ref_id,
                ann_id=ann_id,
                image_id=image_id,
                sent_id=int(sentence["sent_id"]),
                split=split,
                expression=text,
                category_id=int(ann.get("category_id", ref.get("category_id", 0)) or 0),
                image=image,
                box_xywh=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
                segmentation=ann["segmentation"],
                iscrowd=bool(ann.get("iscrowd", 0)),
            )
        )
