"""On-disk embedding cache keyed by (segmenter id, image content hash).

Entries are ``.npz`` files holding the embedding in float16 (or, for an embedding that carries
``extras["packed"]``, its :mod:`segmenter.codec` codes), its geometry and a CRC-32 of the
stored bytes. Writes go to a temporary file in the same folder and are renamed into place,
so readers never see half-written entries, an interrupted writer leaves only a stray temp
file, and two writers of the same entry both produce a complete, identical file. A corrupt
entry (bad archive or checksum) is reported, removed and recomputed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from segmenter.base import ImageEmbedding, Segmenter
from segmenter.codec import CODEC, Packed
from segmenter.io import atomic_write
from segmenter.sam import image_hash
from segmenter.weights import cache_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class EmbeddingCache:
    """Content-addressed store of image embeddings.

    Args:
        root: Folder of the cache (default ``$ALIGNSAM_HOME/embeddings``).
        dtype: Storage dtype; float16 halves the size and keeps decoder agreement high.
    """

    def __init__(self, root: str | Path | None = None, dtype: str = "float16") -> None:
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"
        self.dtype = np.dtype(dtype)
        self._torch_dtype = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        self.hits = 0
        self.misses = 0
        self.recomputed_corrupt = 0
        self.prefetched = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], Future] = {}

    def path_for(self, model_id: str, key: str) -> Path:
        """File of the entry for ``model_id`` and image hash ``key``."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)
        return self.root / safe / key[:2] / f"{key}.npz"

    def has(self, model_id: str, key: str) -> bool:
        """Whether an entry for ``model_id`` and image hash ``key`` is on disk (not checked:
        :meth:`load` checks it)."""
        return self.path_for(model_id, key).is_file()

    def load(
        self, model_id: str, key: str, device: torch.device | str = "cpu"
    ) -> ImageEmbedding | None:
        """The cached embedding, or ``None`` when absent or corrupt (corrupt files are removed)."""
        path = self.path_for(model_id, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                feats = z["features"]
                crc = int(z["crc"])
                codec = meta.get("codec")
                scales = (z["low"], z["step"]) if codec is not None else ()
            if _crc(feats, *scales) != crc or meta.get("model_id") != model_id:
                raise ValueError("checksum or model id mismatch")
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('version')} != {FORMAT_VERSION}")
            if codec is None:
                tensor = torch.from_numpy(feats.astype(np.float32))
            elif codec == CODEC:
                tensor = Packed(feats, *scales, tuple(meta["grid"])).unpack()[None]
            else:
                raise ValueError(f"unknown codec {codec!r}")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            logger.warning("corrupt cache entry %s (%s): removing it and recomputing", path, exc)
            self.recomputed_corrupt += 1
            path.unlink(missing_ok=True)
            return None
        return ImageEmbedding(
            features=tensor.to(device),
            original_size=tuple(meta["original_size"]),
            input_size=tuple(meta["input_size"]),
            model_id=model_id,
            image_hash=key,
        )

    def store(self, emb: ImageEmbedding) -> Path:
        """Write an entry atomically (temp file in the same folder, then rename): the features
        in the cache's dtype, or the codes of ``emb.extras["packed"]`` when it has them."""
        path = self.path_for(emb.model_id, emb.image_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": FORMAT_VERSION,
            "model_id": emb.model_id,
            "original_size": list(emb.original_size),
            "input_size": list(emb.input_size),
        }
        packed: Packed | None = emb.extras.get("packed")
        if packed is None:
            arrays = {"features": emb.features.detach().to("cpu", torch.float32).numpy()}
            arrays["features"] = arrays["features"].astype(self.dtype)
        else:
            arrays = {"features": packed.codes, "low": packed.low, "step": packed.step}
            meta.update(codec=CODEC, grid=list(packed.grid))
        crc = _crc(*arrays.values())
        return atomic_write(path, lambda fh: np.savez(fh, **arrays, meta=json.dumps(meta), crc=crc))

    def get_or_encode(
        self,
        segmenter: Segmenter,
        image: np.ndarray,
        stages: bool = False,
        store_stages: bool = True,
    ) -> ImageEmbedding:
        """The embedding of ``image`` for ``segmenter``, encoding and storing it on a miss.

        The returned features are float32 on the segmenter's device. A hit returns the
        float16-rounded features, so cold and warm results are the same numbers.

        With ``stages`` the encoder's intermediate stages come too, in ``extras["stages"]``
        (:mod:`segmenter.stages`): a second entry beside the embedding (key
        ``segmenter.stages_id``), made by the same encoder pass; an image whose embedding is
        cached without its stages is encoded again once. With ``store_stages=False`` the stages
        are neither read from nor written to the cache (a caller that keeps them in another form,
        e.g. :mod:`segmenter.codec`): asking for them encodes the image, its embedding is stored
        as usual, and the stages come in float32.
        """
        key = image_hash(image)
        emb = self.load(segmenter.embedding_id, key, segmenter.device)
        if emb is not None and stages:
            inner = self.load(segmenter.stages_id, key, segmenter.device) if store_stages else None
            if inner is None:
                emb = None
            else:
                emb.extras["stages"] = inner.features
        if emb is not None:
            self.hits += 1
            return emb
        while (other := self._claim(segmenter.embedding_id, key)) is not None:
            other.result()  # another thread is encoding this image: wait, do not encode twice
            emb = self.load(segmenter.embedding_id, key, segmenter.device)
            if emb is not None and not stages:
                self.hits += 1
                return emb
        try:
            self.misses += 1
            return self._encode_store(segmenter, image, stages, store_stages)
        finally:
            self._release(segmenter.embedding_id, key)

    def _claim(self, model_id: str, key: str) -> Future | None:
        """Claim the encoding of an entry: ``None`` when it is now ours, else the future of
        the thread that holds it."""
        with self._lock:
            other = self._pending.get((model_id, key))
            if other is None:
                self._pending[(model_id, key)] = Future()
            return other

    def _release(self, model_id: str, key: str) -> None:
        with self._lock:
            self._pending.pop((model_id, key)).set_result(None)

    def _encode_store(
        self,
        segmenter: Segmenter,
        image: np.ndarray,
        stages: bool = False,
        store_stages: bool = True,
    ) -> ImageEmbedding:
        emb = segmenter.encode(image, stages=True) if stages else segmenter.encode(image)
        self.store(emb)
        if "packed" not in emb.extras:  # packed features are their codes' values already
            emb.features = emb.features.to(self._torch_dtype).float()
        if stages and store_stages:
            inner = ImageEmbedding(
                features=emb.extras["stages"],
                original_size=emb.original_size,
                input_size=emb.input_size,
                model_id=segmenter.stages_id,
                image_hash=emb.image_hash,
            )
            self.store(inner)
            emb.extras["stages"] = inner.features.to(self._torch_dtype).float()
        return emb

    def prefetch(self, segmenter: Segmenter, loaders: Iterable[Callable[[], np.ndarray]]) -> Future:
        """Encode the images the ``loaders`` return into the cache in a background thread, in
        order, while the caller goes on (e.g. pretrains on images already cached).

        A :meth:`get_or_encode` of an image the worker is encoding waits for it rather than
        encoding it twice. Returns a future of the number of images the worker encoded; its
        ``result()`` re-raises the first error (e.g. an unreadable file).
        """

        def work() -> int:
            done = 0
            for load in loaders:
                image = load()
                key = image_hash(image)
                if self.has(segmenter.embedding_id, key):
                    continue
                if self._claim(segmenter.embedding_id, key) is not None:
                    continue  # someone else is encoding it
                try:
                    if not self.has(segmenter.embedding_id, key):
                        self._encode_store(segmenter, image)
                        done += 1
                finally:
                    self._release(segmenter.embedding_id, key)
            with self._lock:
                self.prefetched += done
            return done

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignsam-prefetch")
        future = pool.submit(work)
        pool.shutdown(wait=False)
        return future


def _crc(*arrays: np.ndarray) -> int:
    """CRC-32 of the arrays' bytes, in order."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc
