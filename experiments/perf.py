"""``alignsam bench perf``: the stock (eager PyTorch) and fast (ONNX Runtime) segmenter paths
side by side in one run, on the same images and prompts.

Figures: encoder ms/image, decoder ms/call, env steps/s, PPO training env-steps/s including the
updates, ``segment`` seconds per 1024-px image, each fast figure as a ratio to its stock twin;
the agreement of fast and stock masks; and the overhead targets (env step vs a bare decoder
call, update share of training time, ``segment`` vs encoder + T decoder calls).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from stable_baselines3.common.callbacks import BaseCallback

from agents.clickers import SimulatedAnnotator
from agents.config import TaskConfig
from agents.prompt_agent import PromptAgent
from agents.training import make_vec_env, train_env_config
from experiments.segmenter_bench import time_env
from recalibration.srm import SemanticRecalibrationModule
from segmenter import EmbeddingCache, SamSegmenter, mask_iou
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)


#: Pause before each timed encoder call, so neither path pays for the other's spinning threads
#: (an encoder call is ~0.7 s: the pause costs nothing against it).
SETTLE_S = 0.02


def _median_ms(values: Sequence[float]) -> float:
    return 1000.0 * statistics.median(values)


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall seconds, started after :data:`SETTLE_S` idle."""
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def time_encoders(
    stock: SamSegmenter, fast: SamSegmenter, images: Sequence[np.ndarray]
) -> tuple[dict[str, float], list[Any]]:
    """Median encoder ms/image of both paths, alternating which goes first per image (each
    call after :data:`SETTLE_S` idle), and the stock embeddings. One warm-up call each is left
    out (the fast path exports and checks itself on first use)."""
    stock.encode(images[0])
    fast.encode(images[0])
    t_stock, t_fast, embeddings = [], [], []
    for i, image in enumerate(progress_bar(images, desc="encoders", unit="img")):
        for seg in (stock, fast) if i % 2 == 0 else (fast, stock):
            emb, seconds = _timed(seg.encode, image)
            (t_stock if seg is stock else t_fast).append(seconds)
            if seg is stock:
                embeddings.append(emb)
    timing = {"stock_ms": _median_ms(t_stock), "fast_ms": _median_ms(t_fast), "images": len(images)}
    return timing, embeddings


def time_decoders(
    stock: SamSegmenter,
    fast: SamSegmenter,
    embeddings: Sequence[Any],
    calls: int = 40,
    block: int = 8,
) -> dict[str, float]:
    """Median decoder ms/call of both paths on the same prompt sets.

    The calls come in blocks of ``block`` on one image, as in an episode: 1 to ``block``
    random points with the image's low-res logits as mask input, back to back. Each block is
    run by one path and then the other, alternating which goes first, and the images take
    turns between blocks. The first call of every block is left out of the timing: it follows
    the other path, and torch's OpenMP threads keep spinning for a while after its last op
    (a fast call right after a stock one was ~3 ms slower: 32 vs 29 ms).
    """
    rng = np.random.default_rng(0)
    # Warm-up, left out: the fast path's export and first-call checks, and every prompt-set
    # size once (ONNX Runtime plans each new input shape on its first run; in an env the
    # sizes recur every episode). Stock's logits on each image serve as its mask input.
    masks = {}
    for seg in (stock, fast):
        for k, e in enumerate(embeddings):
            for n in range(1, block + 1):
                pts = np.full((n, 2), 1.0)
                pred = seg.decode(e, pts, np.ones(n, int))
                seg.decode(e, pts, np.ones(n, int), mask_input=pred.low_res_logits)
                if seg is stock:
                    masks[k] = pred.low_res_logits
    t_stock, t_fast = [], []
    for b in range(max(1, calls // block)):
        k = b % len(embeddings)
        emb = embeddings[k]
        h, w = emb.original_size
        sets = [
            (rng.uniform([0, 0], [w, h], size=(n, 2)), rng.integers(0, 2, n))
            for n in range(1, block + 1)
        ]
        for seg in (stock, fast) if b % 2 == 0 else (fast, stock):
            for j, (pts, lbl) in enumerate(sets):
                t0 = time.perf_counter()
                seg.decode(emb, pts, lbl, mask_input=masks[k] if j else None)
                if j:
                    (t_stock if seg is stock else t_fast).append(time.perf_counter() - t0)
    return {"stock_ms": _median_ms(t_stock), "fast_ms": _median_ms(t_fast), "calls": calls}


def agreement(
    stock: SamSegmenter, fast: SamSegmenter, samples: Sequence[Any], clicks: int = 5
) -> dict[str, Any]:
    """How far the fast path's masks are from the stock path's, end to end (each path encodes
    the image itself and decodes its own prompts).

    ``annotator``: the simulated annotator clicks ``clicks`` times through each path (its clicks
    follow that path's own masks, as a user's would); IoU of the two masks after every click.
    ``random``: one prompt set of 1-4 random points with random labels per image, decoded by
    both from the same points (a stress test: such prompts give fragmented masks).
    """
    rng = np.random.default_rng(0)
    keep = tuple(range(1, clicks + 1))
    per_click, rand = [], []
    for s in progress_bar(samples, desc="agreement", unit="img"):
        image, gt = s.load_image(), np.asarray(s.mask, bool)
        e_stock, e_fast = stock.encode(image), fast.encode(image)
        a = SimulatedAnnotator(stock, max_clicks=clicks).run(e_stock, gt, s.id, keep_masks=keep)
        b = SimulatedAnnotator(fast, max_clicks=clicks).run(e_fast, gt, s.id, keep_masks=keep)
        per_click.append([mask_iou(a.info["masks"][k], b.info["masks"][k]) for k in keep])
        h, w = gt.shape
        n = int(rng.integers(1, 5))
        pts, lbl = rng.uniform([0, 0], [w, h], size=(n, 2)), rng.integers(0, 2, n)
        ma = stock.decode(e_stock, pts, lbl, return_full=True).mask
        mb = fast.decode(e_fast, pts, lbl, return_full=True).mask
        rand.append(mask_iou(ma, mb) if (ma.any() or mb.any()) else 1.0)
    arr = np.asarray(per_click)
    return {
        "images": len(samples),
        "clicks": clicks,
        "annotator_mean_iou": float(arr.mean()),
        "annotator_min_iou": float(arr.min()),
        "annotator_mean_iou_per_click": arr.mean(axis=0).round(5).tolist(),
        "random_mean_iou": float(np.mean(rand)),
        "random_min_iou": float(np.min(rand)),
    }


class _RolloutClock(BaseCallback):
    """Wall time spent collecting rollouts (the rest of ``learn`` is the PPO update)."""

    def __init__(self) -> None:
        super().__init__()
        self.rollout_seconds = 0.0
        self._t0 = 0.0

    def _on_rollout_start(self) -> None:
        self._t0 = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.rollout_seconds += time.perf_counter() - self._t0

    def _on_step(self) -> bool:
        return True


def time_ppo(
    task: TaskConfig,
    segmenter: SamSegmenter,
    samples: Sequence[Any],
    cache: EmbeddingCache,
    rollouts: int = 1,
) -> dict[str, float]:
    """PPO training throughput with the task's settings on cached images: env steps/s including
    the updates, and the share of wall time spent in the updates."""
    from experiments.train import new_ppo

    channels = int(segmenter.embedding_shape[0])
    srm = SemanticRecalibrationModule(task.srm, channels, device=task.device)
    venv = make_vec_env(samples, segmenter, srm, train_env_config(task), 1, cache, task.seed)
    venv.reset()  # embeddings ready before the clock starts
    model = new_ppo(task, venv)
    steps = task.ppo.n_steps * rollouts
    clock = _RolloutClock()
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps, callback=clock)
    total = time.perf_counter() - t0
    return {
        "steps": steps,
        "env_steps_per_s": steps / total,
        "seconds": total,
        "update_seconds": total - clock.rollout_seconds,
        "update_share": (total - clock.rollout_seconds) / total,
    }


def time_segment(
    task: TaskConfig,
    segmenter: SamSegmenter,
    samples: Sequence[Any],
    images: Sequence[np.ndarray],
    steps: int,
) -> dict[str, float]:
    """``segment`` seconds per image of ``images`` (encode + SRM start + ``steps`` agent
    clicks, no cache) with an untrained policy of the task's shape (its speed does not depend
    on training); ``samples`` only give the env the policy is built for.

    The budget is measured on the same image right after: the segment's own encoder time plus
    its decoder calls replayed bare (same embedding, prompts and mask inputs, recorded during
    the segment), so the overhead ratio does not depend on the VM's drift between phases.
    """
    from experiments.train import new_ppo

    channels = int(segmenter.embedding_shape[0])
    srm = SemanticRecalibrationModule(task.srm, channels, device=task.device)
    srm.use_fast_head(segmenter.backend == "onnx")  # as PromptAgent.load does
    venv = make_vec_env(samples[:1], segmenter, srm, train_env_config(task))
    agent = PromptAgent(new_ppo(task, venv), srm, task, segmenter, cache=None)
    agent.use_fast_policy(segmenter.backend == "onnx")  # as PromptAgent.load does
    agent.segment(images[0], steps)  # warm-up
    decode = segmenter.decode
    seconds, encode, calls, replay = [], [], [], []
    for image in images:
        log: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def recording(*args: Any, _log: list = log, **kwargs: Any) -> Any:
            _log.append((args, kwargs))
            return decode(*args, **kwargs)

        segmenter.decode = recording  # instance attribute: only this object, undone below
        try:
            t0 = time.perf_counter()
            out = agent.segment_detailed(image, steps)
            seconds.append(time.perf_counter() - t0)
        finally:
            del segmenter.decode
        encode.append(out["encode_seconds"])
        calls.append(out["decoder_calls"])
        t0 = time.perf_counter()
        for args, kwargs in log:
            decode(*args, **kwargs)
        replay.append(time.perf_counter() - t0)
    over = [s / (e + r) for s, e, r in zip(seconds, encode, replay, strict=True)]
    return {
        "seconds_per_image": statistics.median(seconds),
        "encode_seconds": statistics.median(encode),
        "decoder_calls": float(np.median(calls)),
        "replay_decoder_ms": 1000 * statistics.median(replay) / max(1.0, float(np.median(calls))),
        "ratio_over_budget": statistics.median(over),
        "images": len(images),
    }


def time_candidates(
    stock: SamSegmenter,
    fast: SamSegmenter,
    embeddings: Sequence[Any],
    candidates: int = 10,
    rounds: int = 3,
) -> dict[str, float]:
    """A lookahead step's ``candidates`` prompt sets (the start's two points plus one more
    click each, the start's logits as mask input): one ``decode_batch`` call against as many
    single ``decode`` calls, on each path; milliseconds per step (medians)."""
    rng = np.random.default_rng(1)
    out: dict[str, list[float]] = {}
    for seg, name in ((stock, "stock"), (fast, "fast")):
        for emb in embeddings:  # warm-up: shapes, exports, first-call checks
            h, w = emb.original_size
            start = rng.uniform([0, 0], [w, h], size=(2, 2)).astype(np.float32)
            pred = seg.decode(emb, start, np.array([1, 0]))
            pts = np.concatenate(
                [
                    np.repeat(start[None], candidates, 0),
                    rng.uniform([0, 0], [w, h], (candidates, 1, 2)),
                ],
                axis=1,
            )
            lbl = np.tile(np.array([1, 0, 1]), (candidates, 1))
            seg.decode_batch(emb, pts, lbl, pred.low_res_logits)
        for _ in range(rounds):
            for emb in embeddings:
                h, w = emb.original_size
                start = rng.uniform([0, 0], [w, h], size=(2, 2)).astype(np.float32)
                mask = seg.decode(emb, start, np.array([1, 0])).low_res_logits
                extra = rng.uniform([0, 0], [w, h], (candidates, 1, 2))
                pts = np.concatenate([np.repeat(start[None], candidates, 0), extra], axis=1)
                lbl = np.column_stack([np.ones(candidates), np.zeros(candidates),
                                       rng.integers(0, 2, candidates)]).astype(int)  # fmt: skip
                t0 = time.perf_counter()
                for p, lab in zip(pts, lbl, strict=True):
                    seg.decode(emb, p, lab, mask_input=mask)
                out.setdefault(f"{name}_single_ms", []).append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                seg.decode_batch(emb, pts, lbl, mask)
                out.setdefault(f"{name}_batch_ms", []).append(1000 * (time.perf_counter() - t0))
    med = {k: float(np.median(v)) for k, v in out.items()}
    for name in ("stock", "fast"):
        med[f"{name}_batch_over_single"] = med[f"{name}_batch_ms"] / med[f"{name}_single_ms"]
    med["best_batch_over_fast_single"] = (
        min(med["stock_batch_ms"], med["fast_batch_ms"]) / med["fast_single_ms"]
    )
    med["candidates"] = float(candidates)
    return med


def time_agent_segment(agent: Any, images: Sequence[np.ndarray]) -> dict[str, float]:
    """``segment`` seconds per image of a trained agent (e.g. a lookahead run: encode with
    the encoder's stages, its feature sources, the SRM map, the candidate steps), no cache."""
    agent.cache = None
    agent.segment(images[0])  # warm-up (exports, first-call checks)
    seconds, calls, steps = [], [], []
    for image in images:
        t0 = time.perf_counter()
        out = agent.segment_detailed(image)
        seconds.append(time.perf_counter() - t0)
        calls.append(out["decoder_calls"])
        steps.append(len(out["clicks"]) - 2)
    return {
        "seconds_per_image": statistics.median(seconds),
        "decoder_calls": float(np.median(calls)),
        "clicks_after_start": float(np.mean(steps)),
        "images": len(images),
    }


def time_feature_sources(segmenter: Any, features: Any, images: Sequence[np.ndarray]) -> dict:
    """What an SRM's extra feature sources cost per image: median encoder seconds without and
    with its intermediate stages, each other source's seconds, and the bytes each adds to the
    embedding cache (measured in a scratch cache folder)."""
    import tempfile

    from recalibration.features import SamEmbedding, SamStages, reads_stages
    from segmenter.cache import EmbeddingCache

    out: dict[str, Any] = {"images": len(images)}
    out["encode_s"] = statistics.median(_timed(segmenter.encode, im)[1] for im in images)
    if features.wants_stages:
        out["encode_stages_s"] = statistics.median(
            _timed(segmenter.encode, im, stages=True)[1] for im in images
        )
    sources: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)

        def size() -> int:
            return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())

        for im in images:
            cache.get_or_encode(segmenter, im)
        base = size()
        out["cache_bytes_sam"] = base / len(images)
        for name, source in zip(features.names, features.sources, strict=True):
            if isinstance(source, SamEmbedding):
                continue
            before = size()
            if isinstance(source, SamStages):
                for im in images:
                    cache.get_or_encode(segmenter, im, stages=True)
            else:  # compact:sam_stages encodes again here; at work the pass is shared
                for im in images:
                    cache.get_or_encode(source, im)
            if reads_stages(source):
                seconds = out["encode_stages_s"] - out["encode_s"]
            else:
                seconds = statistics.median(_timed(source.compute, im)[1] for im in images)
            sources[name] = {
                "extra_s": float(seconds),
                "cache_bytes": (size() - before) / len(images),
            }
    out["sources"] = sources
    return out


def to_long_side(image: np.ndarray, side: int = 1024) -> np.ndarray:
    """``image`` resized so its longer side is ``side`` pixels (bilinear)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def run_perf(
    stock: SamSegmenter,
    fast: SamSegmenter,
    task: TaskConfig,
    samples: Sequence[Any],
    agreement_samples: Sequence[Any],
    *,
    decode_calls: int = 40,
    episodes: int = 8,
    ppo_rollouts: int = 1,
    segment_images: int = 3,
    steps: int = 15,
    agent: Any = None,
) -> dict[str, Any]:
    """Every figure of the module docstring, stock and fast, in one run; with ``agent`` (a
    loaded trained agent) also its ``segment`` time on the 1024-px images."""
    images = [s.load_image() for s in samples]
    out: dict[str, Any] = {
        "segmenter": stock.model_id,
        "threads": torch.get_num_threads(),
        "fast_backend": fast.backend,
        "fast_bf16": bool(fast.autocast_bf16),
        "device": str(stock.device),
    }
    out["encoder"], embeddings = time_encoders(stock, fast, images)
    out["decoder"] = time_decoders(stock, fast, embeddings[:5], decode_calls)
    out["agreement"] = agreement(stock, fast, agreement_samples)
    out["candidates"] = time_candidates(stock, fast, embeddings[:5])
    big = [to_long_side(im) for im in images[:segment_images]]
    if agent is not None:
        out["agent_segment"] = time_agent_segment(agent, big)
        feature_set = getattr(getattr(agent, "srm", None), "feature_set", None)
        if feature_set is not None and not feature_set.sam_only:
            out["feature_sources"] = time_feature_sources(stock, feature_set, big)
    for name, seg in (("stock", stock), ("fast", fast)):
        cache = _MemoryCache()
        out[f"env_{name}"] = time_env(seg, samples, episodes=episodes, cache=cache)
        out[f"ppo_{name}"] = time_ppo(task, seg, samples, cache, ppo_rollouts)
        out[f"segment_{name}"] = time_segment(task, seg, samples, big, steps)
    out["fast_backend_after"] = fast.backend  # "torch" if the fast path fell back mid-run
    return out


class _MemoryCache:
    """In-memory embedding cache, so timings do not depend on disk or on fp16 storage."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int], Any] = {}
        self.hits = self.misses = 0

    def get_or_encode(self, segmenter: SamSegmenter, image: np.ndarray) -> Any:
        key = (segmenter.model_id, id(segmenter), image.shape, hash(image.tobytes()))
        if key not in self._store:
            self.misses += 1
            self._store[key] = segmenter.encode(image)
        else:
            self.hits += 1
        return self._store[key]


def render(r: dict[str, Any]) -> str:
    """The printed report: stock vs fast with ratios, and the targets of the performance issue."""
    enc, dec, ag = r["encoder"], r["decoder"], r["agreement"]
    lines = [
        f"[{r['segmenter']} on {r['device']}, {r['threads']} threads, fast backend: "
        f"{r['fast_backend']}{' under bf16 autocast' if r['fast_bf16'] else ''}]",
        f"{'':34s}{'stock':>10s}{'fast':>10s}{'fast/stock':>12s}",
    ]

    def row(name: str, stock: float, fast: float, unit: str, speedup: bool, note: str) -> None:
        ratio = stock / fast if speedup else fast / stock
        lines.append(f"{name:34s}{stock:10.1f}{fast:10.1f}{ratio:10.2f}x {unit}  {note}")

    row("encoder ms/image", enc["stock_ms"], enc["fast_ms"], "faster", True, "(target >= 1.5x)")
    row("decoder ms/call", dec["stock_ms"], dec["fast_ms"], "faster", True, "(target >= 2.0x)")
    es, ef = r["env_stock"], r["env_fast"]
    row("env steps/s", es["env_steps_per_s"], ef["env_steps_per_s"], "faster", False, "")
    ps, pf = r["ppo_stock"], r["ppo_fast"]
    row("PPO training env-steps/s", ps["env_steps_per_s"], pf["env_steps_per_s"], "faster", False,
        "(incl. updates)")  # fmt: skip
    ss, sf = r["segment_stock"], r["segment_fast"]
    row("segment ms/image (1024 px)", 1000 * ss["seconds_per_image"],
        1000 * sf["seconds_per_image"], "faster", True, "")  # fmt: skip
    lines.append(
        f"agreement fast vs stock masks ({ag['images']} images): simulated annotator, clicks "
        f"1-{ag['clicks']}: mean IoU {ag['annotator_mean_iou']:.4f} (min "
        f"{ag['annotator_min_iou']:.4f}; target >= 0.99); random prompts: mean "
        f"{ag['random_mean_iou']:.4f} (min {ag['random_min_iou']:.4f})"
    )
    for name in ("stock", "fast"):
        env, ppo, seg = r[f"env_{name}"], r[f"ppo_{name}"], r[f"segment_{name}"]
        lines.append(
            f"{name}: env step = {env['ratio_step_over_decoder']:.3f} x a bare decoder call "
            f"(target <= 1.10); PPO update {100 * ppo['update_share']:.1f}% of training time "
            f"(target <= 25%); segment = {seg['ratio_over_budget']:.3f} x (its encoder + its "
            f"{seg['decoder_calls']:.0f} decoder calls replayed bare) (target <= 1.10)"
        )
    c = r.get("candidates")
    if c:
        lines.append(
            f"lookahead step, {c['candidates']:.0f} candidates: fast {c['fast_single_ms']:.1f} ms "
            f"as single calls, {c['fast_batch_ms']:.1f} ms batched "
            f"({100 * c['fast_batch_over_single']:.0f}%); stock {c['stock_single_ms']:.1f} / "
            f"{c['stock_batch_ms']:.1f} ms ({100 * c['stock_batch_over_single']:.0f}%); best "
            f"batched vs fast single calls {100 * c['best_batch_over_fast_single']:.0f}% "
            "(target <= 60%)"
        )
    a = r.get("agent_segment")
    if a:
        lines.append(
            f"trained agent: segment {a['seconds_per_image']:.2f} s per 1024-px image "
            f"(budget <= 3 s), {a['decoder_calls']:.0f} decoder calls, "
            f"{a['clicks_after_start']:.1f} clicks after the start"
        )
    if r.get("feature_sources"):
        lines.append(render_feature_sources(r["feature_sources"]))
    if r["fast_backend_after"] != r["fast_backend"]:
        lines.append("WARNING: the fast path fell back to stock during the run (see the log)")
    return "\n".join(lines)


def render_feature_sources(fs: dict[str, Any]) -> str:
    """The lines of :func:`time_feature_sources`' figures."""
    head = f"SRM feature sources per image: encode {fs['encode_s']:.2f} s"
    if "encode_stages_s" in fs:
        head += f" ({fs['encode_stages_s']:.2f} s with its stages)"
    lines = [head + f", embedding {fs['cache_bytes_sam'] / 2**20:.1f} MiB cached"]
    for name, v in fs["sources"].items():
        lines.append(f"  {name}: +{v['extra_s']:.2f} s, +{v['cache_bytes'] / 2**20:.2f} MiB cached")
    return "\n".join(lines)
