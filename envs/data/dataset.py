"""Samples, datasets and the builder every loader uses to collect or skip files."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import numpy as np

from envs.data.images import SKIP_FIX, DataError, load_image, validate_mask

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


@dataclass(frozen=True, eq=False)
class Sample:
    """One image and its binary target mask.

    Attributes:
        id: Unique within its dataset: the file stem, or ``stem#<id>`` for COCO samples.
        image_path: The image file, decoded on demand by :meth:`load_image`.
        mask: ``(H, W)`` ``bool``, read-only, same size as the image after the EXIF
            transpose; never empty, never all ``True``.
    """

    id: str
    image_path: Path
    mask: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        mask = self.mask
        if isinstance(mask, np.ndarray):
            validate_mask(mask, mask.shape[:2], where=f"sample {self.id!r} ({self.image_path})")
        else:
            validate_mask(mask, (0, 0), where=f"sample {self.id!r} ({self.image_path})")
        view = mask.view()
        view.flags.writeable = False
        object.__setattr__(self, "mask", view)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the mask and of the image."""
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def load_image(self) -> np.ndarray:
        """Decode the image.

        Returns:
            ``(H, W, 3)`` ``uint8`` RGB, see :func:`load_image`.
        """
        return load_image(self.image_path)

    def __repr__(self) -> str:
        h, w = self.size
        return f"Sample(id={self.id!r}, image_path={str(self.image_path)!r}, mask={h}x{w})"


@dataclass(eq=False)
class Dataset(Sequence[Sample]):
    """A list of samples plus what was left out while building it.

    Attributes:
        samples: The usable samples, with unique ids.
        name: For logs and summaries, e.g. ``"kvasir-seg/train"``.
        skipped: ``(file, reason)`` for every candidate left out; ``reason`` starts with a
            short category (``"error: ..."``, ``"class absent: ..."``, ...).
    """

    samples: list[Sample]
    name: str = "dataset"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = list(self.samples)
        seen: dict[str, Sample] = {}
        for sample in self.samples:
            if sample.id in seen:
                raise DataError(
                    f"{self.name}: duplicate sample id {sample.id!r} "
                    f"({seen[sample.id].image_path} and {sample.image_path}); ids must be unique"
                )
            seen[sample.id] = sample

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Sample | Dataset:
        if isinstance(index, slice):
            return Dataset(self.samples[index], name=self.name, skipped=list(self.skipped))
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def ids(self) -> list[str]:
        """Sample ids in order."""
        return [s.id for s in self.samples]

    def skip_counts(self) -> dict[str, int]:
        """Number of skipped candidates per reason category (text before the first ``:``)."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def summary(self) -> str:
        """One line, e.g. ``"camvid/val/car: 60 samples, 41 skipped (41 class absent)"``."""
        text = f"{self.name}: {len(self.samples)} samples, {len(self.skipped)} skipped"
        if self.skipped:
            parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skip_counts().items()))
            text += f" ({parts})"
        return text

    def __repr__(self) -> str:
        return f"Dataset({self.summary()!r})"


class DatasetBuilder:
    """Collects samples and skips while a dataset is built, applying ``on_error``."""

    def __init__(self, name: str, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.on_error = on_error
        self.samples: list[Sample] = []
        self.skipped: list[tuple[str, str]] = []
        self._quiet: Counter[str] = Counter()

    def error(self, file: str | Path, exc: DataError) -> None:
        """Raise ``exc`` or record it as a skip, per ``on_error``."""
        if self.on_error == "raise":
            if SKIP_FIX in str(exc):
                raise exc
            raise DataError(f"{exc}; or skip it {SKIP_FIX}") from exc
        logger.warning("%s: skipping %s: %s", self.name, file, exc)
        self.skipped.append((str(file), f"error: {exc}"))

    def leave_out(self, file: str | Path, kind: str, detail: str) -> None:
        """Record an expected omission (absent class, crowd...), logged once per kind."""
        logger.debug("%s: leaving out %s: %s: %s", self.name, file, kind, detail)
        self.skipped.append((str(file), f"{kind}: {detail}"))
        self._quiet[kind] += 1

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def build(self) -> Dataset:
        for kind, n in sorted(self._quiet.items()):
            logger.info("%s: left out %d candidate(s): %s", self.name, n, kind)
        dataset = Dataset(self.samples, name=self.name, skipped=self.skipped)
        logger.info("%s", dataset.summary())
        return dataset
