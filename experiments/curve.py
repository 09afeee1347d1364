"""``alignsam curve TASK --sizes 25 50 100 200 400 --out DIR``: how the agent and what a user
would pick instead grow with the number of labelled images.

For every size N (and seed) the task is trained on its first N labelled images
(``data.train_size``: the ``train`` images, then ``pool``; every larger set holds every smaller
one), each row an ordinary folder, then the existing benchmark scores every row on the same
images of ``--split``. Layout of DIR::

    DIR/n0025_s0/agent/       the task's agent (a run folder: ``alignsam train --resume`` works)
    DIR/n0025_s0/ppo/         the paper's PPO agent (``--ppo-task``, at ``--ppo-sizes``)
    DIR/n0025_s0/finetune/    the fine-tuned decoder (``alignsam finetune --level decoder``)
    DIR/n0025_s0/benchmark/   ``alignsam benchmark`` of those on ``--split``
    DIR/n0025_s0/point.json   the finished point's record (its rows' minutes, memory, budgets)
    DIR/results.json, DIR/results.md, DIR/curve.png

Every step is skipped when its output is complete (a run's ``summary.json``, a benchmark's
``results.json``, a point's ``point.json``), so the same command after a kill resumes at the
first unfinished step.
Rows: the agent, the PPO agent, the SRM-confident heuristic and the fine-tuned decoder with the
SRM's start points (all automatic), the lookahead ceiling (reads the ground truth), and the
simulated annotator's @1 / @3 / @5 (reads the ground truth).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.config import TaskConfig
from agents.prompt_agent import latest_checkpoint
from experiments.answering import choose_clicks
from experiments.benchmark import run_benchmark
from experiments.curve_report import (
    ROWS,
    plot_curve,
    render_curve_markdown,
    summarize,
    summarize_confirm,
)
from experiments.finetune import run_finetune
from experiments.runs import describe_run, peak_memory_mb
from experiments.train import train
from segmenter import EmbeddingCache
from segmenter.finetune import FinetuneConfig
from segmenter.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["CurveConfig", "ROWS", "curve_task", "render_curve_markdown", "run_curve"]


@dataclass
class CurveConfig:
    """What ``alignsam curve`` trains and scores.

    Attributes:
        sizes: Labelled-image counts, ascending.
        seeds: Seeds of every size ...
        extra_seeds: ... and further seeds at the sizes up to ``extra_seeds_max_size``.
        extra_seeds_max_size: The largest size with the extra seeds.
        ppo_task: The paper's PPO agent's task (same data), ``None``: no PPO row.
        ppo_sizes: The sizes with a PPO row (empty: every size).
        finetune: Train and score the fine-tuned decoder row.
        finetune_steps: The fine-tuning budget in images seen (epochs = steps / N, at least 2).
        split: The split every row is scored on.
        limit: Score only the first ``limit`` images of it.
        manual_clicks: The simulated annotator's budget.
        confirm: A second set (a dataset spec, e.g. ``kvasir:test_rest``) the largest size's
            rows (its first seed) are also scored on, for tighter intervals; no ceiling row.
    """

    sizes: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])
    extra_seeds: list[int] = field(default_factory=list)
    extra_seeds_max_size: int = 50
    ppo_task: TaskConfig | None = None
    ppo_sizes: list[int] = field(default_factory=list)
    finetune: bool = True
    finetune_steps: int = 1000
    split: str = "test"
    limit: int | None = None
    manual_clicks: int = 5
    confirm: str | None = None

    def points(self) -> list[tuple[int, int]]:
        """Every ``(size, seed)`` of the curve, in training order: every size with the
        ``seeds`` first, then the extra seeds (a curve cut short has every size once)."""
        out = [(size, seed) for seed in self.seeds for size in self.sizes]
        extra = [s for s in self.extra_seeds if s not in self.seeds]
        small = [size for size in self.sizes if size <= self.extra_seeds_max_size]
        return out + [(size, seed) for seed in extra for size in small]


def curve_task(task: TaskConfig, size: int, seed: int | None = None) -> TaskConfig:
    """``task`` trained on its first ``size`` labelled images (``data.train_size``), with
    ``seed`` when given."""
    data = dataclasses.replace(task.data, train_size=int(size))
    return dataclasses.replace(
        task,
        name=f"{task.name}_n{size}",
        data=data,
        seed=task.seed if seed is None else int(seed),
    )


def _train_row(task: TaskConfig, folder: Path, cache: str | None, progress: bool) -> dict:
    """Train one row into ``folder`` (resuming an unfinished one); its ``summary.json``."""
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    resume = folder if task.agent == "ppo" and latest_checkpoint(folder) is not None else None
    out = train(
        None if resume else task,
        resume=resume,
        cache_dir=cache,
        progress=progress,
        run_dir=None if resume else folder,
    )
    logger.info(describe_run(out))
    return out


def _finetune_row(
    task: TaskConfig, folder: Path, steps: int, cache: EmbeddingCache, progress: bool
) -> dict:
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    n = task.data.train_size or 50
    config = FinetuneConfig(level="decoder", epochs=max(2, round(steps / n)), seed=task.seed)
    resume = (folder / "delta.pt").is_file()
    return run_finetune(task, folder, config, cache=cache, resume=resume, progress=progress)


def run_point(
    task: TaskConfig,
    config: CurveConfig,
    size: int,
    seed: int,
    out: Path,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and benchmark every row of one ``(size, seed)``; returns the point's record.

    A finished point keeps its record in ``point.json`` next to ``benchmark/``: the next run
    reads it back and trains nothing, so a curve stays whole when the heavy row folders
    (agents, deltas, embeddings) of its finished points are deleted or never copied."""
    folder = out / f"n{size:04d}_s{seed}"
    wanted = {"agent"}
    if config.ppo_task is not None and (not config.ppo_sizes or size in config.ppo_sizes):
        wanted.add("ppo")
    if config.finetune:
        wanted.add("finetuned_b")
    t_task = curve_task(task, size, seed)
    choose = t_task.agent == "lookahead" and t_task.lookahead.choose_clicks
    max_worse = t_task.lookahead.max_worse if choose else None
    shifts = list(t_task.lookahead.choose_shifts) if choose else []
    veto = t_task.lookahead.veto if choose else None
    done = _finished_point(folder)
    # An agent trained before its task chose its clicks (or its answer under max_worse, on
    # shifted copies of val, or with a veto) on val gets them chosen (one val pass, the value
    # model fitted first when max_worse asks for it) when its folder is still there; a point
    # whose agent is gone keeps its record.
    stale = done is not None and choose
    stale = stale and (
        done.get("agent_clicks") is None
        or done.get("agent_max_worse") != max_worse
        or done.get("agent_choose_shifts", []) != shifts
        or done.get("agent_veto") != veto
    )
    stale = stale and (folder / "agent" / "summary.json").is_file()
    if done is not None and wanted <= set(done["minutes"]) and not stale:
        return done
    if done is not None:  # a row was added since: the benchmark must score it with the others
        added = sorted(wanted - set(done["minutes"])) + (["clicks chosen on val"] if stale else [])
        logger.info("%s: adding %s", folder, ", ".join(added))
        bench = folder / "benchmark"
        (bench / "results.json").replace(bench / "results.before.json")
        for confirmed in folder.glob("confirm_*/results.json"):  # the same rows, scored again
            confirmed.replace(confirmed.with_name("results.before.json"))
    folder.mkdir(parents=True, exist_ok=True)
    cache = EmbeddingCache(cache_dir)
    record: dict[str, Any] = {
        "size": size,
        "seed": seed,
        "folder": str(folder),
        "minutes": {},
        "budgets": _budgets(t_task, size),
    }
    t0 = time.perf_counter()
    summary = _train_row(t_task, folder / "agent", cache_dir, progress)
    if choose and (
        "clicks" not in summary
        or summary.get("max_worse") != max_worse
        or summary.get("choose_shifts", []) != shifts
        or summary.get("veto") != veto
    ):
        value = max_worse is not None  # trained before the task chose its answer this way
        summary = choose_clicks(
            folder / "agent", cache_dir, progress, max_worse, value, shifts, veto=veto
        )
    if "clicks" in summary:
        record["agent_clicks"] = summary["clicks"]
        record["agent_max_worse"] = summary.get("max_worse")
        record["agent_choose_shifts"] = summary.get("choose_shifts", [])
        record["agent_veto"] = summary.get("veto")
        record["agent_answer"] = {k: summary.get(k) for k in ("keep", "margin", "val_worse")}
    record["minutes"]["agent"] = summary.get("train_seconds_total", summary["wall_seconds"]) / 60
    record["peak_memory_mb"] = {"agent": summary.get("peak_memory_mb")}
    runs = [folder / "agent"]
    if "ppo" in wanted:
        p_task = curve_task(config.ppo_task, size, seed)
        p = _train_row(p_task, folder / "ppo", cache_dir, progress)
        record["minutes"]["ppo"] = p.get("train_seconds_total", p["wall_seconds"]) / 60
        runs.append(folder / "ppo")
    deltas = []
    if config.finetune:
        f = _finetune_row(t_task, folder / "finetune", config.finetune_steps, cache, progress)
        record["minutes"]["finetuned_b"] = f["wall_seconds"] / 60
        deltas.append(folder / "finetune" / "delta.pt")
    bench = folder / "benchmark"
    if not (bench / "results.json").is_file():
        methods = ["heuristics"]
        if t_task.agent == "lookahead":
            methods.append("lookahead_oracle")
        run_benchmark(
            t_task,
            runs,
            split=config.split,
            limit=config.limit,
            out=bench,
            cache=cache,
            manual_clicks=config.manual_clicks,
            methods=methods,
            progress=progress,
            finetuned=deltas,
            finetuned_agent=False,
        )
    record["benchmark"] = str(bench)
    record["seconds"] = time.perf_counter() - t0
    text = json.dumps(record, indent=2).encode()
    atomic_write(folder / POINT_FILE, lambda fh: fh.write(text))
    return record


def _budgets(task: TaskConfig, size: int) -> dict[str, Any]:
    """The agent's training budgets at ``size`` images, as the record states them."""
    return {
        "srm_pretrain_steps": task.srm_pretrain_steps,
        "srm_epochs": task.srm_epochs(size),
        "judge_images": task.lookahead.judge_images if task.agent == "lookahead" else None,
    }


#: A finished point's record, written last.
POINT_FILE = "point.json"


def _finished_point(folder: Path) -> dict[str, Any] | None:
    """The record of a point whose ``point.json`` and benchmark are both there, else ``None``
    (its benchmark path re-read from where the folder is now)."""
    bench = folder / "benchmark"
    if not ((folder / POINT_FILE).is_file() and (bench / "results.json").is_file()):
        return None
    record = json.loads((folder / POINT_FILE).read_text())
    record["folder"], record["benchmark"] = str(folder), str(bench)
    return record


def _config_dict(config: CurveConfig) -> dict[str, Any]:
    """``config`` as plain data (a Ray trial rebuilds it with :func:`_config_from`)."""
    d = dataclasses.asdict(config)
    d["ppo_task"] = None if config.ppo_task is None else config.ppo_task.to_dict()
    return d


def _config_from(d: dict[str, Any]) -> CurveConfig:
    ppo = d.get("ppo_task")
    ppo_task = None if ppo is None else TaskConfig.from_dict(ppo, where="curve --ppo-task")
    return CurveConfig(**{**d, "ppo_task": ppo_task})


def _curve_trainable(trial: dict[str, Any]) -> None:
    """One Ray Tune trial: one ``(size, seed)`` point, resumed from its folder."""
    from ray import tune

    from experiments.distributed import _threads

    _threads(trial["threads"])
    task = TaskConfig.from_dict(trial["task"], where="curve trial")
    record = run_point(
        task,
        _config_from(trial["curve"]),
        int(trial["point"][0]),
        int(trial["point"][1]),
        Path(trial["out"]),
        trial["cache_dir"],
        progress=False,
    )
    tune.report({"record": json.dumps(record)})


def _points_on_ray(
    task: TaskConfig,
    config: CurveConfig,
    out: Path,
    cache_dir: str | None,
    address: str,
    threads: int,
) -> list[dict[str, Any]]:
    """Every point as a Ray Tune trial (a failed trial is retried from its folder)."""
    from experiments.distributed import connect

    connect(address)
    from ray import tune

    space = {
        "point": tune.grid_search([list(p) for p in config.points()]),
        "task": task.to_dict(),
        "curve": _config_dict(config),
        "out": str(out.resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "threads": threads,
    }
    tuner = tune.Tuner(
        tune.with_resources(_curve_trainable, {"cpu": threads}),
        param_space=space,
        run_config=tune.RunConfig(
            name="curve",
            storage_path=str(out.resolve() / "_tune"),
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=0,
        ),
    )
    records = []
    for r in tuner.fit():
        if r.error:
            raise RuntimeError(f"curve point {r.config['point']} failed: {r.error}")
        records.append(json.loads(r.metrics["record"]))
    return sorted(records, key=lambda rec: (rec["size"], rec["seed"]))


def _write(out: Path, result: dict[str, Any]) -> None:
    data = json.dumps(result, indent=2).encode()
    atomic_write(out / "results.json", lambda fh: fh.write(data))
    (out / "results.md").write_text(render_curve_markdown(result))
    plot_curve(result, out / "curve.png")


def run_curve(
    task: TaskConfig,
    config: CurveConfig,
    out: str | Path,
    cache_dir: str | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    threads_per_trial: int = 1,
) -> dict[str, Any]:
    """Every point of the curve (resuming finished steps), then ``results.json``,
    ``results.md`` and ``curve.png`` in ``out`` (rewritten after every point). With
    ``ray_address`` (``""``: a local Ray) the points run as Ray Tune trials."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    points = config.points()
    if ray_address is not None:
        records = _points_on_ray(task, config, out, cache_dir, ray_address, threads_per_trial)
        points = []  # done
    else:
        records = []
    result: dict[str, Any] = {}
    for i, (size, seed) in enumerate(points):
        logger.info(
            "curve point %d/%d: %d labelled images, seed %d", i + 1, len(points), size, seed
        )
        records.append(run_point(task, config, size, seed, out, cache_dir, progress))
        result = _result(task, config, records, t0)
        _write(out, result)  # a curve stopped early shows what it has
    if ray_address is not None:
        result = _result(task, config, records, t0)
    if config.confirm and records:
        result["confirm"] = _confirm(task, config, out, cache_dir, progress)
    if ray_address is not None or config.confirm:
        _write(out, result)
    return result


def _confirm(
    task: TaskConfig, config: CurveConfig, out: Path, cache_dir: str | None, progress: bool
) -> dict[str, Any]:
    """The largest size's rows (first seed) benchmarked on ``config.confirm`` (resumable:
    skipped when its ``results.json`` is there)."""
    size, seed = max(config.sizes), config.seeds[0]
    folder = out / f"n{size:04d}_s{seed}"
    bench = folder / ("confirm_" + "".join(c if c.isalnum() else "_" for c in config.confirm))
    if not (bench / "results.json").is_file():
        if not (folder / "agent" / "summary.json").is_file():
            raise FileNotFoundError(
                f"--confirm: the {size}-image agent ({folder / 'agent'}) is gone; put the run "
                "folder back, or delete its point.json to train it again"
            )
        t_task = curve_task(task, size, seed)
        runs = [folder / "agent"]
        if (folder / "ppo" / "summary.json").is_file():
            runs.append(folder / "ppo")
        delta = folder / "finetune" / "delta.pt"
        logger.info("curve: the %d-image rows on %s", size, config.confirm)
        run_benchmark(
            t_task,
            runs,
            out=bench,
            cache=EmbeddingCache(cache_dir),
            manual_clicks=config.manual_clicks,
            methods=["heuristics"],
            progress=progress,
            finetuned=[delta] if delta.is_file() else [],
            finetuned_agent=False,
            dataset_spec=config.confirm,
        )
    return summarize_confirm(bench, config.confirm, size)


def _result(
    task: TaskConfig, config: CurveConfig, records: list[dict[str, Any]], t0: float
) -> dict[str, Any]:
    return {
        "task": task.name,
        "agent": task.agent,
        "split": config.split,
        "limit": config.limit,
        "train_spec": task.data.train,
        "pool_spec": task.data.pool,
        "points_done": len(records),
        "points_planned": [list(p) for p in config.points()],
        "points": records,
        **summarize(records),
        "seconds": time.perf_counter() - t0,
        "peak_memory_mb": peak_memory_mb(),
    }
