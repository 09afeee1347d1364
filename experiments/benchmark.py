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
* ``manual @k``: the simulated annotator (RITM protocol, reads the ground truth) after k clicks.

Metrics per image (:mod:`segmenter.metrics`): IoU, Dice, F-beta (beta^2 = 0.3), MAE, BER (%),
E-measure; per method their means, a percentile-bootstrap 95 % interval of the mIoU, and for
each method a paired bootstrap interval of its mIoU difference to the first agent. Outputs:
``results.json``, ``results.md``, ``curves.png`` (mIoU vs clicks), ``examples.png`` (best,
median and worst images of the first agent).
"""

from __future__ import annotations

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
from experiments.train import load_train_split
from recalibration.labelers import PositiveWithMap
from segmenter import EmbeddingCache, Segmenter, build_segmenter
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
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # packed masks of kept images
    clicks_points: dict[str, np.ndarray] = field(default_factory=dict)

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
    seg = segmenter or build_segmenter(
        task.segmenter, checkpoint=task.checkpoint, device=task.device, autocast_bf16=task.bf16
    )
    agents = [PromptAgent.load(r, segmenter=seg, cache=cache) for r in run_dirs]
    names = ["agent"] if len(agents) == 1 else [f"agent {Path(r).name}" for r in run_dirs]

    # Encode once; every method below reads the cached embeddings.
    t0 = time.perf_counter()
    misses = cache.misses
    embeddings = [
        cache.get_or_encode(seg, s.load_image())
        for s in tqdm(samples, desc="encode", unit="img", disable=not progress)
    ]
    encoded = cache.misses - misses
    encode_s = (time.perf_counter() - t0) / encoded if encoded else None
    gts = [np.asarray(s.mask, bool) for s in samples]

    results: list[MethodResult] = []
    ref = agents[0]
    overrides = {} if abstain_margin is None else {"abstain_margin": float(abstain_margin)}
    config = ref.eval_config(full_res_eval=False, **overrides)

    def env_method(
        name: str,
        policy: Any,
        labeler: Any,
        steps: int | None = None,
        env_config: Any = None,
    ) -> MethodResult:
        env = PointPromptEnv(samples, seg, labeler, env_config or config, cache=cache)
        clicker = EnvClicker(env, policy, seed=seed)
        res = MethodResult(name, "automatic")
        for i in tqdm(range(len(samples)), desc=name, unit="img", disable=not progress):
            tr = clicker.run(i, steps)
            res.add(
                samples[i].id,
                tr.final_mask,
                gts[i],
                tr.n_clicks,
                tr.seconds,
                tr.decoder_calls,
                _trace_points(tr),
            )
            res.curve.append(list(tr.ious))
        results.append(res)
        return res

    for name, agent in zip(names, agents, strict=True):  # each in its own env settings
        env_method(
            name,
            _agent_policy(agent),
            agent.srm,
            env_config=agent.eval_config(full_res_eval=False, **overrides),
        )
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
            for s, emb, gt in zip(samples, embeddings, gts, strict=True):
                tr = oneshot.run(emb, gt, s.id)
                res.add(s.id, tr.final_mask, gt, tr.n_clicks, tr.seconds, 1, _trace_points(tr))
            results.append(res)

    # Manual prompting: the simulated annotator, masks kept at each reported k.
    ks = tuple(k for k in MANUAL_KS if k <= manual_clicks)
    annotator = SimulatedAnnotator(seg, max_clicks=manual_clicks, selection="score")
    manual = {k: MethodResult(f"manual @{k}", "manual") for k in ks}
    traces: list[ClickTrace] = []
    for s, emb, gt in tqdm(
        list(zip(samples, embeddings, gts, strict=True)),
        desc="manual",
        unit="img",
        disable=not progress,
    ):
        tr = annotator.run(emb, gt, s.id, keep_masks=ks)
        traces.append(tr)
        for k in ks:
            n = min(k, tr.n_clicks)
            secs = tr.info["seconds_at"][n - 1] if n else 0.0
            pts = _trace_points(tr)[:n]
            manual[k].add(s.id, tr.info["masks"][k], gt, n, secs, n, pts)
    results.extend(manual.values())

    result = _assemble(
        task, split, samples, seg, run_dirs, results, traces, manual_clicks, seed, encode_s
    )
    result["env"] = asdict(config)  # the fixed policies' settings (agents: their runs')
    result["skipped"] = [list(item) for item in samples.skipped]
    result["seconds"] = time.perf_counter() - t_start
    atomic_write(out / "results.json", lambda fh: fh.write(json.dumps(result, indent=2).encode()))
    (out / "results.md").write_text(render_markdown(result))
    plot_curves(result, results, traces, out / "curves.png")
    plot_examples(samples, gts, results, out / "examples.png")
    return result


def _assemble(
    task: TaskConfig,
    split: str,
    samples: Sequence[Any],
    seg: Segmenter,
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
    return {
        "task": task.name,
        "split": split,
        "n_images": len(samples),
        "segmenter": seg.model_id,
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
        "per_image": {m.name: m.per_image for m in methods},
    }


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _clicks_phrase(k: float | None, manual_clicks: int) -> str:
    if k is None:
        return f"more than {manual_clicks}"
    if k < 1:
        return "less than 1"
    return f"{k:.1f}"


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
        " | clicks | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"{r['clicks']:.1f} | {r['seconds']:.2f} |"
        )
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
        "Manual @k reads the ground truth (a human's clicks); every other method is automatic.",
    ]
    return "\n".join(lines) + "\n"


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
