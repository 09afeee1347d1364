"""``alignsam benchmark``: trained agents against manual prompting and the method's ablations.

Every method prompts the same frozen segmenter on the same images with the same cached
embeddings, and is scored on its final full-resolution mask:

* ``agent``: each trained run (SRM start points, T policy clicks, SRM labels);
* ``agent w/o SRM``: the same policy, every click labelled positive (observation and start
  still from the SRM, so the policy sees what it was trained on);
* ``agent single step``: the SRM start and one policy click;
* ``random + SRM (w/o RL)``, ``centre + SRM``, ``grid + SRM``, ``SRM-confident``: fixed click
  policies in the same environment with the same SRM (:class:`~agents.clickers.EnvClicker`);
* ``SRM start only``: the two SRM initial points, no further click;
* ``one-shot similarity``: PerSAM-style points from one training image's prototype, and the
  few-shot variant from every training image (:class:`~agents.clickers.OneShotSimilarity`);
* ``manual @k``: the simulated annotator (RITM protocol, reads the ground truth) after k clicks;
* ``fine-tuned ...`` (``finetuned=`` deltas of ``alignsam finetune``): the fine-tuned segmenter
  (a) with no prompt, (b) with the SRM's two start points, and for a decoder delta (c) the
  reference agent prompting the fine-tuned decoder (same embeddings, so the same policy input);
* ``automatic masks + SRM pick`` and its oracle pick (``amg``): SAM's stock automatic mask
  generator on the cached embedding, then the union of the masks the SRM calls foreground, or
  the mask closest to the ground truth (a ceiling that reads the answer).

Metrics per image (:mod:`segmenter.metrics`): IoU, Dice, F-beta (beta^2 = 0.3), MAE, BER (%),
E-measure; per method their means, a percentile-bootstrap 95 % interval of the mIoU, and for
each method a paired bootstrap interval of its mIoU difference to the first agent. Outputs:
``results.json``, ``results.md``, ``curves.png`` (mIoU vs clicks), ``examples.png`` (best,
median and worst images of the first agent).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from agents.amg import AutoMaskGenerator, choose_thresholds, pick_by_foreground, pick_oracle
from agents.clickers import (
    ClickTrace,
    EnvClicker,
    OneShotSimilarity,
    SimulatedAnnotator,
    miou_at_k,
    noc,
)
from agents.config import TaskConfig
from agents.prompt_agent import PromptAgent, library_versions
from envs import PointPromptEnv
from envs.render import overlay
from experiments.datasets import load_dataset, readable
from experiments.finetune import read_summary
from experiments.train import load_train_split
from recalibration.labelers import PositiveWithMap
from segmenter import EmbeddingCache, Segmenter, build_segmenter
from segmenter.finetune import apply_delta, load_delta
from segmenter.io import atomic_write
from segmenter.metrics import mask_metrics

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("iou", "dice", "f_beta", "mae", "ber", "e_measure")
#: Method groups of :func:`run_benchmark` (``methods=``); the agents and the simulated manual
#: annotator (the headline's reference) always run.
METHOD_GROUPS: tuple[str, ...] = (
    "wo_srm",
    "single_step",
    "random",
    "heuristics",
    "start_only",
    "oneshot",
    "amg",
)
MANUAL_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap ``(lo, hi)`` interval of the mean of ``values``."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_diff_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired images and its percentile-bootstrap interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = bootstrap_ci(d, n_boot, alpha, seed)
    return float(d.mean()), lo, hi


def position_on_curve(value: float, curve: Sequence[float]) -> float | None:
    """Where ``value`` lies on an increasing mIoU-vs-clicks ``curve`` (``curve[k-1]`` = mIoU@k),
    as a fractional number of clicks by linear interpolation; ``None`` above the curve's end,
    ``0.0`` below its first point (less than one click)."""
    c = np.maximum.accumulate(np.asarray(curve, np.float64))
    if value > c[-1]:
        return None
    if value <= c[0]:
        return 0.0 if value < c[0] else 1.0
    k = int(np.argmax(c >= value))  # first index reaching value (k >= 1)
    lo, hi = c[k - 1], c[k]
    return float(k + (value - lo) / (hi - lo)) if hi > lo else float(k + 1)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """Per-image outcomes of one method."""

    name: str
    kind: str  # "automatic" or "manual"
    per_image: list[dict[str, Any]] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)  # IoU after each click, per image
    start_clicks: int = 0  # leading clicks of each curve decoded together (the start prompts)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # packed masks of kept images
    clicks_points: dict[str, np.ndarray] = field(default_factory=dict)
    train_seconds: float | None = None  # what learning it took (None: training-free)
    trainable_params: int | None = None

    def add(
        self,
        sample_id: str,
        mask: np.ndarray,
        gt: np.ndarray,
        clicks: int,
        seconds: float,
        calls: int,
        points: np.ndarray | None = None,
    ) -> None:
        row = {"id": sample_id, **mask_metrics(mask, gt), "clicks": clicks}
        row.update(seconds=seconds, decoder_calls=calls)
        self.per_image.append(row)
        self.masks[sample_id] = np.packbits(mask, axis=None)
        if points is not None:
            self.clicks_points[sample_id] = np.asarray(points, np.float32)

    def add_trace(self, trace: ClickTrace, gt: np.ndarray) -> None:
        """Record one image's click trace (its final mask, clicks, time and decoder calls)."""
        self.add(
            trace.sample_id,
            trace.final_mask,
            gt,
            trace.n_clicks,
            trace.seconds,
            trace.decoder_calls,
            _trace_points(trace),
        )

    def mask(self, sample_id: str, shape: tuple[int, int]) -> np.ndarray:
        bits = np.unpackbits(self.masks[sample_id], count=shape[0] * shape[1])
        return bits.reshape(shape).astype(bool)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.per_image]

    def summary(self, seed: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name, "kind": self.kind, "n": len(self.per_image)}
        for key in (*METRICS, "clicks", "seconds", "decoder_calls"):
            out[key] = float(np.mean(self.values(key)))
        out["iou_ci95"] = bootstrap_ci(self.values("iou"), seed=seed)
        out["train_seconds"] = self.train_seconds
        out["trainable_params"] = self.trainable_params
        return out


def _trace_points(trace: ClickTrace) -> np.ndarray:
    return np.concatenate([trace.points, trace.labels[:, None]], axis=1)


def _agent_policy(agent: PromptAgent) -> Callable[..., int]:
    def agent_policy(env: PointPromptEnv, obs: dict[str, np.ndarray], allowed: np.ndarray) -> int:
        return agent.act(env, obs)

    return agent_policy


def run_benchmark(
    task: TaskConfig,
    run_dirs: Sequence[str | Path],
    split: str = "test",
    limit: int | None = None,
    out: str | Path = "benchmark",
    *,
    seed: int = 0,
    cache: EmbeddingCache | None = None,
    segmenter: Segmenter | None = None,
    manual_clicks: int = 20,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    abstain_margin: float | None = None,
    skip_bad: bool = False,
    finetuned: Sequence[str | Path] = (),
    amg_points_per_side: int = 32,
    amg_tune_images: int = 10,
    ray_address: str | None = None,
    ray_workers: int | None = None,
) -> dict[str, Any]:
    """Run every method on ``task``'s ``split`` and write the results to ``out``.

    Args:
        task: The task (data splits and segmenter).
        run_dirs: Run folders of trained agents (the first one is the reference agent).
        split: ``train``, ``val`` or ``test``.
        limit: Use only the first ``limit`` images.
        out: Output folder.
        seed: Seed of the random clicker and the bootstrap.
        cache: Embedding cache (default: the user cache).
        segmenter: The frozen segmenter (default: built from the task).
        manual_clicks: Click budget of the simulated annotator.
        methods: Subset of :data:`METHOD_GROUPS` to run besides the agents (default: all).
        progress: Progress bars.
        abstain_margin: Override the environment's ``abstain_margin`` for every
            environment-based method, the agents included (``None``: each agent's own setting,
            and the reference agent's for the fixed policies).
        skip_bad: Leave out unusable images and masks and list them in ``results.json``
            (``skipped``) instead of stopping at the first (the task's ``data.on_error``).
        finetuned: Fine-tuning deltas (``alignsam finetune`` folders or ``delta.pt`` files) of
            this task's segmenter, each benchmarked as its automatic variants.
        amg_points_per_side: Point grid side of the automatic mask generator (SAM: 32).
        amg_tune_images: ``val`` images on which the generator's two filter thresholds are
            chosen (0: SAM's defaults).
        ray_address: Shard the images over Ray workers (``""``: a local Ray instance, else
            the cluster's address); the cache folder must be shared by the workers. The
            numbers are those of a local run.
        ray_workers: Number of shards (default: the cluster's CPUs).

    Returns:
        The ``results.json`` content.
    """
    if not run_dirs:
        raise ValueError("benchmark needs at least one trained run (--runs RUN_DIR)")
    want = set(METHOD_GROUPS if methods is None else methods)
    unknown = want - set(METHOD_GROUPS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHOD_GROUPS}")
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = getattr(task.data, split, None)
    if not spec:
        raise ValueError(f"task {task.name} has no {split!r} split")
    on_error = "skip" if skip_bad else task.data.on_error
    dataset = load_dataset(spec, on_error)
    samples = readable(dataset[:limit] if limit else dataset, on_error, name=spec)
    cache = cache if cache is not None else EmbeddingCache()
    options = MethodOptions(
        want=tuple(sorted(want)),
        seed=seed,
        manual_clicks=manual_clicks,
        abstain_margin=abstain_margin,
        finetuned=tuple(str(Path(d).resolve()) for d in finetuned),
        amg_points_per_side=amg_points_per_side,
        amg_tune_images=amg_tune_images,
        progress=progress,
    )
    if ray_address is None:
        seg = segmenter or build_segmenter(
            task.segmenter, checkpoint=task.checkpoint, device=task.device, autocast_bf16=task.bf16
        )
        shards = [run_methods(task, run_dirs, samples, range(len(samples)), cache, seg, options)]
    else:
        from experiments.distributed import benchmark_shards

        shards = benchmark_shards(
            task, run_dirs, samples, cache.root, options, address=ray_address, workers=ray_workers
        )
    results, traces, encode_s, env_config = merge_shards(shards)

    result = _assemble(
        task,
        split,
        samples,
        shards[0].segmenter_id,
        run_dirs,
        results,
        traces,
        manual_clicks,
        seed,
        encode_s,
    )
    result["env"] = env_config  # the fixed policies' settings (agents: their runs')
    result["skipped"] = [list(item) for item in samples.skipped]
    result["seconds"] = time.perf_counter() - t_start
    result["workers"] = len(shards)
    atomic_write(out / "results.json", lambda fh: fh.write(json.dumps(result, indent=2).encode()))
    (out / "results.md").write_text(render_markdown(result))
    plot_curves(result, results, traces, out / "curves.png")
    gts = [np.asarray(s.mask, bool) for s in samples]
    plot_examples(samples, gts, results, out / "examples.png")
    return result


@dataclass(frozen=True)
class MethodOptions:
    """What :func:`run_methods` runs besides the agents, and how (picklable, for workers)."""

    want: tuple[str, ...]
    seed: int = 0
    manual_clicks: int = 20
    abstain_margin: float | None = None
    finetuned: tuple[str, ...] = ()
    amg_points_per_side: int = 32
    amg_tune_images: int = 10
    progress: bool = True


@dataclass
class Shard:
    """Every method's outcomes on a subset of the images (one worker's share)."""

    methods: list[MethodResult]
    traces: list[ClickTrace]
    encoded: int
    encode_seconds: float
    env_config: dict[str, Any]
    segmenter_id: str


def run_methods(
    task: TaskConfig,
    run_dirs: Sequence[str | Path],
    samples: Sequence[Any],
    indices: Sequence[int],
    cache: EmbeddingCache,
    seg: Segmenter,
    options: MethodOptions,
) -> Shard:
    """Run every method on ``samples[i]`` for ``i`` in ``indices``.

    Environments hold the whole sample list and are addressed by the global index, so the
    seeded random clicks of an image (``default_rng([seed, index])``) do not depend on how the
    images are split over workers: a sharded run gives the numbers of a local one.
    """
    indices = list(indices)
    want, seed, progress = set(options.want), options.seed, options.progress
    agents = [PromptAgent.load(r, segmenter=seg, cache=cache) for r in run_dirs]
    names = ["agent"] if len(agents) == 1 else [f"agent {Path(r).name}" for r in run_dirs]

    # Encode once; every method below reads the cached embeddings.
    t0 = time.perf_counter()
    misses = cache.misses
    embeddings = {
        i: cache.get_or_encode(seg, samples[i].load_image())
        for i in tqdm(indices, desc="encode", unit="img", disable=not progress)
    }
    encoded = cache.misses - misses
    encode_seconds = time.perf_counter() - t0
    gts = {i: np.asarray(samples[i].mask, bool) for i in indices}

    results: list[MethodResult] = []
    ref = agents[0]
    overrides = {} if options.abstain_margin is None else {"abstain_margin": options.abstain_margin}
    config = ref.eval_config(full_res_eval=False, **overrides)

    def env_method(
        name: str,
        policy: Any,
        labeler: Any,
        steps: int | None = None,
        env_config: Any = None,
        segmenter: Segmenter | None = None,
    ) -> MethodResult:
        env = PointPromptEnv(samples, segmenter or seg, labeler, env_config or config, cache=cache)
        clicker = EnvClicker(env, policy, seed=seed)
        res = MethodResult(name, "automatic")
        for i in tqdm(indices, desc=name, unit="img", disable=not progress):
            tr = clicker.run(i, steps)
            res.add_trace(tr, gts[i])
            res.curve.append(list(tr.ious))
            res.start_clicks = tr.start_clicks
        results.append(res)
        return res

    for name, agent, run in zip(names, agents, run_dirs, strict=True):  # own env settings
        res = env_method(
            name,
            _agent_policy(agent),
            agent.srm,
            env_config=agent.eval_config(full_res_eval=False, **overrides),
        )
        res.train_seconds, res.trainable_params = _agent_cost(agent, run)
    if "wo_srm" in want:
        env_method("agent w/o SRM (all positive)", _agent_policy(ref), PositiveWithMap(ref.srm))
    if "single_step" in want:
        env_method("agent single step", _agent_policy(ref), ref.srm, steps=1)
    if "random" in want:
        env_method("random + SRM (w/o RL)", "random", ref.srm)
    if "heuristics" in want:
        env_method("centre + SRM", "centre", ref.srm)
        env_method("grid + SRM", "grid", ref.srm)
        env_method("SRM-confident", "srm_confident", ref.srm)
    if "start_only" in want:
        env_method("SRM start only", "random", ref.srm, steps=0)

    if "oneshot" in want:  # one-shot / few-shot similarity prompts from the training split
        train = load_train_split(ref.task)  # the agent's own training images
        refs = [(cache.get_or_encode(seg, s.load_image()), np.asarray(s.mask, bool)) for s in train]
        for name, fit in (
            ("one-shot similarity (1 ref)", lambda o: o.fit(*refs[0])),
            (f"few-shot similarity ({len(refs)} refs)", lambda o: o.fit_many(refs)),
        ):
            oneshot = fit(OneShotSimilarity(seg))
            res = MethodResult(name, "automatic")
            for i in indices:
                res.add_trace(oneshot.run(embeddings[i], gts[i], samples[i].id), gts[i])
            results.append(res)

    for delta in options.finetuned:
        _finetuned_methods(
            delta, seg, samples, indices, cache, env_method, ref, config, progress, results
        )
    if "amg" in want:
        results.extend(
            _amg_methods(
                seg,
                samples,
                indices,
                cache,
                ref,
                config,
                options.amg_points_per_side,
                progress,
                options.amg_tune_images,
            )
        )

    # Manual prompting: the simulated annotator, masks kept at each reported k.
    manual_clicks = options.manual_clicks
    ks = tuple(k for k in MANUAL_KS if k <= manual_clicks)
    annotator = SimulatedAnnotator(seg, max_clicks=manual_clicks, selection="score")
    manual = {k: MethodResult(f"manual @{k}", "manual") for k in ks}
    traces: list[ClickTrace] = []
    for i in tqdm(indices, desc="manual", unit="img", disable=not progress):
        tr = annotator.run(embeddings[i], gts[i], samples[i].id, keep_masks=ks)
        traces.append(tr)
        for k in ks:
            n = min(k, tr.n_clicks)
            secs = tr.info["seconds_at"][n - 1] if n else 0.0
            pts = _trace_points(tr)[:n]
            manual[k].add(samples[i].id, tr.info["masks"][k], gts[i], n, secs, n, pts)
    results.extend(manual.values())
    return Shard(results, traces, encoded, encode_seconds, asdict(config), seg.model_id)


def merge_shards(
    shards: Sequence[Shard],
) -> tuple[list[MethodResult], list[ClickTrace], float | None, dict[str, Any]]:
    """One result per method over all shards, in shard order (the images' order)."""
    first = shards[0]
    merged = [copy.copy(m) for m in first.methods]
    for m in merged:
        m.per_image, m.curve = list(m.per_image), list(m.curve)
        m.masks, m.clicks_points = dict(m.masks), dict(m.clicks_points)
    traces = list(first.traces)
    for shard in shards[1:]:
        if [m.name for m in shard.methods] != [m.name for m in merged]:
            raise RuntimeError("benchmark shards ran different methods")
        for m, part in zip(merged, shard.methods, strict=True):
            m.per_image += part.per_image
            m.curve += part.curve
            m.masks.update(part.masks)
            m.clicks_points.update(part.clicks_points)
        traces += shard.traces
    encoded = sum(s.encoded for s in shards)
    encode_s = sum(s.encode_seconds for s in shards) / encoded if encoded else None
    return merged, traces, encode_s, first.env_config


def _agent_cost(agent: PromptAgent, run: str | Path) -> tuple[float | None, int]:
    """Training wall time of a run over all its sessions (SRM pretraining and PPO; ``None`` for
    runs resumed before that total was recorded) and its learned parameters."""
    summary = Path(run) / "summary.json"
    seconds = (
        json.loads(summary.read_text()).get("train_seconds_total") if summary.is_file() else None
    )
    policy = sum(p.numel() for p in agent.model.policy.parameters())
    srm = sum(p.numel() for p in agent.srm.head.parameters())
    return seconds, int(policy + srm)


def _finetuned_methods(
    delta: str | Path,
    seg: Segmenter,
    samples: Sequence[Any],
    indices: Sequence[int],
    cache: EmbeddingCache,
    env_method: Callable[..., MethodResult],
    ref: PromptAgent,
    config: Any,
    progress: bool,
    results: list[MethodResult],
) -> None:
    """Append the automatic variants of one fine-tuned segmenter to ``results``: (a) no prompt,
    (b) the SRM's start points and, for a decoder delta, (c) the reference agent prompting it
    (``env_method`` appends the environment-based ones itself)."""
    level = load_delta(delta)["level"]
    tuned = apply_delta(copy.deepcopy(seg), delta)
    info = read_summary(delta)
    label = f"fine-tuned {level}"
    first = len(results)
    no_prompt = MethodResult(f"{label} (a) no prompt", "automatic")
    results.append(no_prompt)
    for i in tqdm(indices, desc=no_prompt.name, disable=not progress):
        s = samples[i]
        emb = cache.get_or_encode(tuned, s.load_image())  # a decoder delta: the base's entry
        t0 = time.perf_counter()
        pred = tuned.decode(emb, np.zeros((0, 2)), np.zeros(0), return_full=True)
        no_prompt.add(s.id, pred.mask, s.mask, 0, time.perf_counter() - t0, 1)
    if level == "decoder":  # the SRM and policy read the embeddings, which are unchanged
        env_method(f"{label} (b) SRM start points", "random", ref.srm, 0, None, tuned)
        env_method(
            f"{label} (c) agent prompting it", _agent_policy(ref), ref.srm, None, config, tuned
        )
    for m in results[first:]:
        m.train_seconds = info.get("train_seconds")
        m.trainable_params = info.get("trainable_params")


def _amg_methods(
    seg: Segmenter,
    samples: Sequence[Any],
    indices: Sequence[int],
    cache: EmbeddingCache,
    ref: PromptAgent,
    config: Any,
    points_per_side: int,
    progress: bool,
    tune_images: int = 0,
) -> list[MethodResult]:
    """SAM's automatic mask generator, then the SRM's pick and the oracle pick. Its two filter
    thresholds are chosen on the first ``tune_images`` ``val`` images (SRM pick mIoU)."""
    thresholds, scores = (0.88, 0.95), {}
    if tune_images and ref.task.data.val:
        from experiments.train import load_split

        val = load_split(ref.task, "val")[:tune_images]
        loose = AutoMaskGenerator(
            seg, points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0
        )
        env = PointPromptEnv(val, seg, ref.srm, config, cache=cache)
        gens, fgs, embs = [], [], []
        for i in tqdm(range(len(val)), desc="automatic masks: tune on val", disable=not progress):
            env.reset(options={"index": i, "start": "none"})
            fg, emb = env.foreground_map()
            gens.append(loose.generate(val[i].load_image(), emb))
            fgs.append(fg)
            embs.append(emb)
        gts = [np.asarray(s.mask, bool) for s in val]
        thresholds, scores = choose_thresholds(gens, fgs, embs, gts)
        logger.info("automatic masks: val SRM-pick mIoU per filter pair %s", scores)
    generator = AutoMaskGenerator(
        seg,
        points_per_side=points_per_side,
        pred_iou_thresh=thresholds[0],
        stability_score_thresh=thresholds[1],
    )
    env = PointPromptEnv(samples, seg, ref.srm, config, cache=cache)
    what = f"automatic masks ({points_per_side}x{points_per_side}, iou>={thresholds[0]}, "
    what += f"stability>={thresholds[1]})"
    srm_pick = MethodResult(f"{what} + SRM pick", "automatic")
    oracle = MethodResult(f"{what} + oracle pick (ceiling: reads GT)", "oracle")
    srm_pick.trainable_params = oracle.trainable_params = 0
    for i in tqdm(indices, desc="automatic masks", disable=not progress):
        s, gt = samples[i], np.asarray(samples[i].mask, bool)
        env.reset(options={"index": i, "start": "none"})
        foreground, emb = env.foreground_map()
        gen = generator.generate(s.load_image(), emb)
        t0 = time.perf_counter()
        mask, _ = pick_by_foreground(gen, foreground, emb)
        pick_s = time.perf_counter() - t0
        n = gen.point_prompts
        srm_pick.add(s.id, mask, gt, 0, gen.seconds + pick_s, n)
        best, _ = pick_oracle(gen, gt)
        oracle.add(s.id, best, gt, 0, gen.seconds, n)
    return [srm_pick, oracle]


def _assemble(
    task: TaskConfig,
    split: str,
    samples: Sequence[Any],
    segmenter_id: str,
    run_dirs: Sequence[str | Path],
    methods: list[MethodResult],
    traces: list[ClickTrace],
    manual_clicks: int,
    seed: int,
    encode_s: float | None,
) -> dict[str, Any]:
    ref = methods[0]
    rows = []
    for m in methods:
        row = m.summary(seed)
        if m is not ref:
            row["diff_vs_agent"] = paired_diff_ci(m.values("iou"), ref.values("iou"), seed=seed)
        rows.append(row)
    curve = [miou_at_k(traces, k) for k in range(1, manual_clicks + 1)]
    manual = {
        "miou_at_k": {str(k): v for k, v in enumerate(curve, start=1)},
        "noc@85": float(np.mean([noc(t.ious, 0.85, manual_clicks) for t in traces])),
        "noc@90": float(np.mean([noc(t.ious, 0.90, manual_clicks) for t in traces])),
        "max_clicks": manual_clicks,
    }
    agent_miou = rows[0]["iou"]
    lo, hi = rows[0]["iou_ci95"]
    by_click = _by_click(methods, seed)
    return {
        "task": task.name,
        "split": split,
        "n_images": len(samples),
        "segmenter": segmenter_id,
        "runs": [str(r) for r in run_dirs],
        "seed": seed,
        "versions": {**library_versions(), "python": platform.python_version()},
        "encode_seconds_per_image": encode_s,
        "methods": rows,
        "manual": manual,
        "headline": {
            "agent_miou": agent_miou,
            "agent_miou_ci95": [lo, hi],
            "agent_equals_manual_clicks": position_on_curve(agent_miou, curve),
            "ci_equals_manual_clicks": [position_on_curve(lo, curve), position_on_curve(hi, curve)],
        },
        "by_click": by_click,
        "per_image": {m.name: m.per_image for m in methods},
    }


def _by_click(methods: list[MethodResult], seed: int) -> dict[str, Any] | None:
    """mIoU after the start prompts and after each of the next clicks, for the agent (the first
    method) and every automatic method whose click traces have the agent's length (the same
    start and budget: random, heuristics, the agent's ablations with its T), with the paired
    bootstrap interval of each method's difference to the agent at every budget. ``None`` when
    the agent has no click traces."""
    ref = methods[0]
    if not ref.curve or len({len(c) for c in ref.curve}) != 1:
        return None
    length, first = len(ref.curve[0]), max(ref.start_clicks - 1, 0)
    agent = np.asarray(ref.curve, np.float64)[:, first:]
    # Column 0 is the start prompts' IoU (k = 0), or the first click when there is no start.
    offset = int(ref.start_clicks == 0)
    budgets = list(range(offset, offset + agent.shape[1]))
    out: dict[str, Any] = {"clicks_after_start": budgets, "methods": {}}
    for m in methods:
        same = m.start_clicks == ref.start_clicks and len(m.curve) == len(ref.curve)
        if m.kind != "automatic" or not same or any(len(c) != length for c in m.curve):
            continue
        ious = np.asarray(m.curve, np.float64)[:, first:]
        row: dict[str, Any] = {"miou": ious.mean(0).tolist()}
        if m is not ref:
            row["diff_vs_agent"] = [
                paired_diff_ci(ious[:, k].tolist(), agent[:, k].tolist(), seed=seed)
                for k in range(ious.shape[1])
            ]
        out["methods"][m.name] = row
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _clicks_phrase(k: float | None, manual_clicks: int) -> str:
    if k is None:
        return f"more than {manual_clicks}"
    if k < 1:
        return "less than 1"
    return f"{k:.1f}"


def _opt(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_markdown(result: dict[str, Any]) -> str:
    """The ``results.md`` table and headline."""
    h = result["headline"]
    mc = result["manual"]["max_clicks"]
    lo_k, hi_k = h["ci_equals_manual_clicks"]
    lines = [
        f"# alignsam benchmark: {result['task']} ({result['split']}, {result['n_images']} images,"
        f" {result['segmenter']})",
        "",
        f"**Headline:** the agent's mIoU {h['agent_miou']:.3f} (95% CI "
        f"{h['agent_miou_ci95'][0]:.3f}-{h['agent_miou_ci95'][1]:.3f}) equals "
        f"**{_clicks_phrase(h['agent_equals_manual_clicks'], mc)} manual clicks** of the simulated"
        f" annotator (CI: {_clicks_phrase(lo_k, mc)} to {_clicks_phrase(hi_k, mc)}).",
        "",
        "| method | mIoU [95% CI] | Δ vs agent [95% CI] | Dice | F-beta | MAE | BER % | E-measure"
        " | clicks | s/image | training s | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["methods"]:
        lo, hi = r["iou_ci95"]
        if "diff_vs_agent" in r:
            d, dlo, dhi = r["diff_vs_agent"]
            sig = "" if dlo <= 0 <= dhi else " *"
            diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]{sig}"
        else:
            diff = "reference"
        lines.append(
            f"| {r['method']} | {r['iou']:.3f} [{lo:.3f}, {hi:.3f}] | {diff} | {r['dice']:.3f} | "
            f"{r['f_beta']:.3f} | {r['mae']:.3f} | {r['ber']:.2f} | {r['e_measure']:.3f} | "
            f"{r['clicks']:.1f} | {r['seconds']:.2f} | {_opt(r.get('train_seconds'), '.0f')} | "
            f"{_opt(r.get('trainable_params'), ',d')} |"
        )
    lines += _by_click_lines(result.get("by_click"))
    m = result["manual"]
    curve = m["miou_at_k"]
    marks = ", ".join(f"@{k} {curve[str(k)]:.3f}" for k in MANUAL_KS if str(k) in curve)
    enc = result.get("encode_seconds_per_image")
    lines += [
        "",
        f"Manual annotator (RITM protocol, {mc} clicks): mIoU {marks}; NoC@85 {m['noc@85']:.2f},"
        f" NoC@90 {m['noc@90']:.2f}.",
        "",
        "`*`: the paired bootstrap interval of the difference excludes 0 (a real difference);"
        " without `*` the two methods are within noise. Clicks include the SRM's two start"
        " points. s/image: prompting and decoding with the embedding cached"
        + (f"; encoding costs {enc:.2f} s/image once, shared by all methods." if enc else "."),
        "Manual @k reads the ground truth (a human's clicks), and so does an oracle pick; every"
        " other method is automatic. Training s: wall time of the agent's run (SRM pretraining"
        " and PPO) or of the fine-tuning; '-' for methods that learn nothing of their own"
        " (random + SRM reuses the agent's SRM). Automatic masks: decoder calls count the"
        " generator's single-point prompts.",
    ]
    return "\n".join(lines) + "\n"


def _by_click_lines(by_click: dict[str, Any] | None) -> list[str]:
    """The by-budget table: each automatic method's mIoU after k clicks past the start, with
    its paired difference to the agent (``*`` where the interval excludes 0)."""
    if not by_click or len(by_click["methods"]) < 2:
        return []
    budgets = by_click["clicks_after_start"]
    shown = [i for i, k in enumerate(budgets) if k in (0, 1, 2, 3, 5, 10) or i == len(budgets) - 1]
    lines = [
        "",
        "mIoU after k clicks past the start (the same start prompts and images; Δ vs the agent"
        " at that budget in brackets):",
        "",
        "| method | " + " | ".join(f"k={budgets[i]}" for i in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for name, row in by_click["methods"].items():
        cells = []
        for i in shown:
            cell = f"{row['miou'][i]:.3f}"
            if "diff_vs_agent" in row:
                d, lo, hi = row["diff_vs_agent"][i]
                cell += f" ({d:+.3f}{'' if lo <= 0 <= hi else '*'})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(
    result: dict[str, Any], methods: list[MethodResult], traces: list[ClickTrace], path: Path
) -> None:
    """mIoU vs number of clicks: the manual annotator's curve with the automatic methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    mc = result["manual"]["max_clicks"]
    curve = [result["manual"]["miou_at_k"][str(k)] for k in range(1, mc + 1)]
    ax.plot(range(1, mc + 1), curve, "k-o", ms=3, label="manual (simulated annotator)")
    for m in methods:
        if m.kind != "automatic" or not m.curve or not all(m.curve):
            continue
        n = min(len(c) for c in m.curve)
        start = len(m.curve[0]) - n + 1 if n else 1
        ys = [float(np.mean([c[i] for c in m.curve])) for i in range(n)]
        ax.plot(range(start, start + n), ys, "-", lw=1.5, label=m.name)
    for m in methods:
        if m.kind == "automatic" and not m.curve:
            ax.scatter([np.mean(m.values("clicks"))], [np.mean(m.values("iou"))], marker="s", s=25)
            ax.annotate(m.name, (np.mean(m.values("clicks")), np.mean(m.values("iou"))), fontsize=7)
    ax.set_xlabel("clicks (automatic methods: SRM start points + agent / policy clicks)")
    ax.set_ylabel("mIoU")
    ax.set_title(f"{result['task']} {result['split']} ({result['n_images']} images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(
    samples: Sequence[Any],
    gts: Sequence[np.ndarray],
    methods: list[MethodResult],
    path: Path,
    columns: Sequence[str] = ("random + SRM (w/o RL)", "manual @3"),
    height: int = 240,
) -> None:
    """Best, median and worst images of the first agent, beside other methods on the same image."""
    from PIL import Image, ImageDraw

    ref = methods[0]
    by_name = {m.name: m for m in methods}
    cols = [ref] + [by_name[c] for c in columns if c in by_name]
    order = np.argsort(ref.values("iou"))
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    rows = []
    for label, idx in picks.items():
        s, gt = samples[int(idx)], gts[int(idx)]
        image = s.load_image()
        tiles = []
        for m in cols:
            mask = m.mask(s.id, gt.shape)
            pts = m.clicks_points.get(s.id, np.zeros((0, 3), np.float32))
            tile = overlay(image, mask, pts[:, :2], pts[:, 2], outline=gt)
            iou = next(r["iou"] for r in m.per_image if r["id"] == s.id)
            pil = Image.fromarray(tile)
            pil = pil.resize((max(1, round(pil.width * height / pil.height)), height))
            ImageDraw.Draw(pil).text((4, 4), f"{label} | IoU {iou:.2f} | {m.name}", fill="white")
            tiles.append(np.asarray(pil))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
