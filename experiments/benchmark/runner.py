"""Running the benchmark: every method on the same images, merged and written out."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from agents.clickers import ClickTrace, SimulatedAnnotator
from agents.config import ConfigError, TaskConfig
from agents.prompt_agent import PromptAgent
from experiments.benchmark.methods import (
    METHOD_GROUPS,
    METHODS,
    MethodContext,
    MethodOptions,
    agent_cost,
    agent_policy,
)
from experiments.benchmark.report import plot_curves, plot_examples, render_markdown
from experiments.benchmark.results import (
    MANUAL_KS,
    MethodResult,
    Shard,
    assemble,
    merge_shards,
    trace_points,
)
from experiments.datasets import load_dataset, readable
from experiments.distributed import benchmark_shards
from segmenter import EmbeddingCache, Segmenter, build_segmenter
from segmenter.io import atomic_write
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["agent_names", "render_legend", "run_benchmark", "run_methods"]


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
    finetuned_agent: bool = True,
    amg_points_per_side: int = 32,
    amg_tune_images: int = 10,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    dataset_spec: str | None = None,
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
        methods: Subset of the selectable groups of :data:`~experiments.benchmark.methods.METHODS`
            to run besides the agents (default: all).
        progress: Progress bars.
        abstain_margin: Override the environment's ``abstain_margin`` for every
            environment-based method, the agents included (``None``: each agent's own setting,
            and the reference agent's for the fixed policies).
        skip_bad: Leave out unusable images and masks and list them in ``results.json``
            (``skipped``) instead of stopping at the first (the task's ``data.on_error``).
        finetuned: Fine-tuning deltas (``alignsam finetune`` folders or ``delta.pt`` files) of
            this task's segmenter, each benchmarked as its automatic variants.
        finetuned_agent: Also the (c) variant, the reference agent prompting each fine-tuned
            decoder (the curve leaves it out: a second run of the agent per image).
        amg_points_per_side: Point grid side of the automatic mask generator (SAM: 32).
        amg_tune_images: ``val`` images on which the generator's two filter thresholds are
            chosen (0: SAM's defaults).
        ray_address: Shard the images over Ray workers (``""``: a local Ray instance, else
            the cluster's address); the cache folder must be shared by the workers. The
            numbers are those of a local run.
        ray_workers: Number of shards (default: the cluster's CPUs).
        dataset_spec: Benchmark on these images instead of the task's ``split`` (a dataset
            spec, e.g. ``kvasir:test@down384``, an image shift of the test split).

    Returns:
        The ``results.json`` content.
    """
    if not run_dirs:
        raise ValueError("benchmark needs at least one trained run (--agents RUN)")
    want = set(METHOD_GROUPS if methods is None else methods)
    unknown = want - set(METHOD_GROUPS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHOD_GROUPS}")
    if finetuned:
        want.add("finetuned")
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = dataset_spec or getattr(task.data, split, None)
    if not spec:
        raise ConfigError(f"task {task.name} has no {split!r} split; pick another --split")
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
        finetuned_agent=finetuned_agent,
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
        shards = benchmark_shards(
            run_methods,
            task,
            run_dirs,
            samples,
            cache.root,
            options,
            address=ray_address,
            workers=ray_workers,
        )
    results, traces, encode_s, env_config = merge_shards(shards)

    result = assemble(
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
    result["dataset"] = spec
    result["skipped"] = [list(item) for item in samples.skipped]
    result["seconds"] = time.perf_counter() - t_start
    result["workers"] = len(shards)
    atomic_write(out / "results.json", lambda fh: fh.write(json.dumps(result, indent=2).encode()))
    (out / "results.md").write_text(render_markdown(result))
    (out / "legend.md").write_text(render_legend(result) + "\n")
    plot_curves(result, results, traces, out / "curves.png")
    gts = [np.asarray(s.mask, bool) for s in samples]
    plot_examples(samples, gts, results, out / "examples.png")
    return result


def agent_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """The agents' method names: ``agent`` for one; for several, ``agent TASK/KIND`` read from
    each run's ``config.json`` (plus the seed, then a number, where that is not unique), short
    enough for plots. ``legend.md`` beside the plots maps each name to its run folder."""
    if len(run_dirs) == 1:
        return ["agent"]

    def config(run: str | Path) -> dict[str, Any]:
        try:
            return json.loads((Path(run) / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    configs = [config(r) for r in run_dirs]
    names = [
        f"agent {c.get('name', Path(r).name.split('__')[0])}/{c.get('agent', 'ppo')}"
        + (" adapted" if (Path(r) / "adapted.json").is_file() else "")  # alignsam adapt
        for c, r in zip(configs, run_dirs, strict=True)
    ]
    if len(set(names)) < len(names):
        names = [f"{n} s{c.get('seed', 0)}" for n, c in zip(names, configs, strict=True)]
    if len(set(names)) < len(names):
        names = [f"{n} #{i + 1}" for i, n in enumerate(names)]
    return names


def render_legend(result: dict[str, Any]) -> str:
    """``legend.md``: each agent's short name in the tables and plots, and its run folder."""
    names = agent_names(result["runs"])
    rows = [f"| {n} | `{r}` |" for n, r in zip(names, result["runs"], strict=True)]
    return "\n".join(
        ["# Agents in this benchmark", "", "| name | run folder |", "|---|---|", *rows]
    )


def run_methods(
    task: TaskConfig,
    run_dirs: Sequence[str | Path],
    samples: Sequence[Any],
    indices: Sequence[int],
    cache: EmbeddingCache,
    seg: Segmenter,
    options: MethodOptions,
) -> Shard:
    """Run every method on ``samples[i]`` for ``i`` in ``indices``: the agents, each group of
    :data:`~experiments.benchmark.methods.METHODS` in ``options.want`` (in the table's order),
    then the simulated annotator.

    Environments hold the whole sample list and are addressed by the global index, so the
    seeded random clicks of an image (``default_rng([seed, index])``) do not depend on how the
    images are split over workers: a sharded run gives the numbers of a local one.
    """
    indices = list(indices)
    progress = options.progress
    agents = [PromptAgent.load(r, segmenter=seg, cache=cache) for r in run_dirs]
    names = agent_names(run_dirs)

    # Encode once; every method below reads the cached embeddings.
    t0 = time.perf_counter()
    misses = cache.misses
    embeddings = {
        i: cache.get_or_encode(seg, samples[i].load_image())
        for i in progress_bar(indices, desc="encode", unit="img", disable=not progress)
    }
    encoded = cache.misses - misses
    encode_seconds = time.perf_counter() - t0
    gts = {i: np.asarray(samples[i].mask, bool) for i in indices}

    ref = agents[0]
    overrides = {} if options.abstain_margin is None else {"abstain_margin": options.abstain_margin}
    config = ref.eval_config(full_res_eval=False, **overrides)
    ctx = MethodContext(task, samples, indices, embeddings, gts, cache, seg, ref, config, options)
    for name, agent, run in zip(names, agents, run_dirs, strict=True):  # own env settings
        if getattr(agent, "kind", "ppo") == "lookahead":
            res = ctx.lookahead_method(name, agent)
            res.train_seconds, res.trainable_params = agent_cost(agent, run)
            continue
        res = ctx.env_method(
            name,
            agent_policy(agent),
            agent.srm,
            env_config=agent.eval_config(full_res_eval=False, **overrides),
        )
        res.train_seconds, res.trainable_params = agent_cost(agent, run)
    for group in METHODS.values():
        if group.name in options.want:
            group.run(ctx)
    results = ctx.results

    # Manual prompting: the simulated annotator, masks kept at each reported k.
    manual_clicks = options.manual_clicks
    ks = tuple(k for k in MANUAL_KS if k <= manual_clicks)
    annotator = SimulatedAnnotator(seg, max_clicks=manual_clicks, selection="score")
    manual = {k: MethodResult(f"manual @{k}", "manual") for k in ks}
    traces: list[ClickTrace] = []
    for i in progress_bar(indices, desc="manual", unit="img", disable=not progress):
        tr = annotator.run(embeddings[i], gts[i], samples[i].id, keep_masks=ks)
        traces.append(tr)
        for k in ks:
            n = min(k, tr.n_clicks)
            secs = tr.info["seconds_at"][n - 1] if n else 0.0
            pts = trace_points(tr)[:n]
            manual[k].add(samples[i].id, tr.info["masks"][k], gts[i], n, secs, n, pts)
    results.extend(manual.values())
    return Shard(results, traces, encoded, encode_seconds, asdict(config), seg.model_id)
