"""Measurements of the segmenter layer: encode/decode timing, single-click quality, env speed."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from segmenter import EmbeddingCache, SamSegmenter, mask_iou
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` pixel centre of the point farthest from the mask boundary (RITM's first click)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def one_click_iou(
    segmenter: SamSegmenter, samples: Sequence[Any], cache: EmbeddingCache | None = None
) -> dict[str, Any]:
    """Mean IoU of one positive click at the deepest interior point of each ground truth.

    Three selection rules are reported: SAM's single-mask head, the multimask candidate with the
    highest predicted IoU ("score"), and the candidate with the best true IoU ("oracle",
    SAM's best-of-3).
    """
    rows = []
    for s in progress_bar(samples, desc="one click", unit="img"):
        image = s.load_image()
        emb = cache.get_or_encode(segmenter, image) if cache else segmenter.encode(image)
        pt = np.array([deepest_point(s.mask)], np.float32)
        single = segmenter.decode(emb, pt, [1], return_full=True)
        multi = segmenter.decode(emb, pt, [1], multimask=True)
        ious = [mask_iou(segmenter.upscale(emb, c), s.mask) for c in multi.candidates]
        best_by_score = int(torch.argmax(multi.candidate_scores))
        rows.append(
            {
                "id": s.id,
                "single": mask_iou(single.mask, s.mask),
                "score": ious[best_by_score],
                "oracle": max(ious),
            }
        )
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("single", "score", "oracle")}
    return {"n": len(rows), "mean_iou": summary, "per_image": rows}


def time_segmenter(
    segmenter: SamSegmenter, samples: Sequence[Any], decode_calls: int = 20
) -> dict[str, float]:
    """Encode cold (model) vs cached (disk load) per image, and decoder ms per call.

    The cached figure reads entries written to a fresh temporary cache in the same run, so
    both columns cover the same images.
    """
    images = [s.load_image() for s in samples]
    cold, warm, dec = [], [], []
    with tempfile.TemporaryDirectory(prefix="alignsam-bench-") as tmp:
        cache = EmbeddingCache(tmp)
        for image in progress_bar(images, desc="encode (cold)", unit="img"):
            t0 = time.perf_counter()
            cache.get_or_encode(segmenter, image)
            cold.append(time.perf_counter() - t0)
        for image in progress_bar(images, desc="encode (cached)", unit="img"):
            t0 = time.perf_counter()
            emb = cache.get_or_encode(segmenter, image)
            warm.append(time.perf_counter() - t0)
        rng = np.random.default_rng(0)
        h, w = emb.original_size
        segmenter.decode(emb, [[w / 2, h / 2]], [1])  # warm-up
        prev = None
        for i in range(decode_calls):
            n = 1 + i % 8
            pts = rng.uniform([0, 0], [w, h], size=(n, 2))
            lbl = rng.integers(0, 2, n)
            t0 = time.perf_counter()
            prev = segmenter.decode(emb, pts, lbl, mask_input=prev.low_res_logits if prev else None)
            dec.append(time.perf_counter() - t0)
    return {
        "images": len(images),
        "encode_cold_s_per_image": statistics.median(cold),
        "encode_cold_images_per_s": 1.0 / statistics.median(cold),
        "encode_cached_s_per_image": statistics.median(warm),
        "encode_cached_images_per_s": 1.0 / statistics.median(warm),
        "decode_ms_per_call": 1000 * statistics.median(dec),
        "decode_calls": len(dec),
        "threads": torch.get_num_threads(),
    }


def time_env(
    segmenter: SamSegmenter,
    samples: Sequence[Any],
    episodes: int = 6,
    labeler: Any = None,
    cache: EmbeddingCache | None = None,
) -> dict[str, float]:
    """Env steps/s next to bare decoder calls/s on the same prompt sets, in one run.

    Episodes use random legal actions. Right after each env step, the prompt set it decoded is
    decoded again with a bare ``segmenter.decode`` call (same points, labels and mask input), so
    the ratio compares like with like, and at the same moment: the VM's speed drifts by 10-30%
    over minutes, which made a ratio of all steps first and all bare calls after unreliable.
    """
    from envs import EnvConfig, PointPromptEnv

    env = PointPromptEnv(samples, segmenter, labeler, EnvConfig(), cache=cache)
    rng = np.random.default_rng(0)
    for i in range(len(samples)):  # encode / prepare outside the timed region
        env.reset(seed=i, options={"index": i})
    step_times, bare = [], []
    for ep in range(episodes):
        env.reset(seed=ep, options={"index": ep % len(samples)})
        for _ in range(env.config.max_steps):
            action = int(rng.choice(np.flatnonzero(env.action_masks())))
            prev = env.session.logits
            t0 = time.perf_counter()
            env.step(action)
            step_times.append(time.perf_counter() - t0)
            session = env.session
            emb, pts, lbl = session.embedding, session.points.copy(), session.labels.copy()
            t0 = time.perf_counter()
            segmenter.decode(emb, pts, lbl, mask_input=prev)
            bare.append(time.perf_counter() - t0)
    step = statistics.median(step_times)
    dec = statistics.median(bare)
    return {
        "steps": len(step_times),
        "env_steps_per_s": 1.0 / step,
        "decoder_calls_per_s": 1.0 / dec,
        "env_step_ms": 1000 * step,
        "decoder_call_ms": 1000 * dec,
        "ratio_step_over_decoder": step / dec,
        "labeler": env.labeler.name,
    }
