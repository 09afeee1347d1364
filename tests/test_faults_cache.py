"""Cache faults: a corrupted or truncated embedding entry is detected (checksum) and
recomputed; concurrent writers of one entry leave one valid file."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch

from segmenter import EmbeddingCache
from segmenter.registry import build_tiny_sam


def test_cache_detects_corruption(tiny_segmenter, rgb_image, tmp_path, faults):
    cache = EmbeddingCache(tmp_path / "emb")
    emb = cache.get_or_encode(tiny_segmenter, rgb_image)
    path = cache.path_for(emb.model_id, emb.image_hash)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    again = cache.get_or_encode(tiny_segmenter, rgb_image)
    assert cache.recomputed_corrupt == 1 and cache.misses == 2
    assert torch.equal(again.features, emb.features)
    path.write_bytes(b"")  # truncated to nothing
    cache.get_or_encode(tiny_segmenter, rgb_image)
    assert cache.recomputed_corrupt == 2
    faults.survived("corrupted cache entry recomputed")
    faults.survived("truncated cache entry recomputed")


def _embed_worker(root: str, seed: int) -> str:
    seg = build_tiny_sam()
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    for _ in range(5):
        cache = EmbeddingCache(root)
        cache.store(seg.encode(img))
    return cache.path_for(seg.model_id, seg.encode(img).image_hash).as_posix()


def test_cache_concurrent_writers_leave_one_valid_entry(tmp_path, tiny_segmenter, faults):
    root = str(tmp_path / "emb")
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_embed_worker, [(root, 7), (root, 7)])
    assert paths[0] == paths[1]
    entries = [p for p in Path(root).rglob("*") if p.is_file()]
    assert len(entries) == 1 and entries[0].suffix == ".npz"
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    cache = EmbeddingCache(root)
    assert cache.load(tiny_segmenter.model_id, tiny_segmenter.encode(img).image_hash) is not None
    faults.survived("two writers of one cache entry")
