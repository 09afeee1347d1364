"""The benchmark's methods, by name: what ``--methods`` chooses from and ``--help`` lists.

Each entry of :data:`METHODS` runs one group of methods on the benchmark's images and appends
its :class:`~experiments.benchmark.results.MethodResult` rows to the context. The trained
agents and the simulated annotator (the headline's reference) always run; entries run in the
order of this table. Adding a method is one entry here::

    @register_method("centre_only", "one click at the image centre, SRM label")
    def centre_only(ctx: MethodContext) -> None:
        ctx.env_method("centre click + SRM", "centre", ctx.ref.srm, steps=1)

Everything a method needs is on the :class:`MethodContext`: the images, their cached
embeddings and ground truth, the segmenter, the reference agent (its SRM and env settings) and
the options.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segmenter.progress import progress_bar

# The table is read by ``alignsam --help``: the heavy parts (torch, SB3) are imported by the
# methods that use them, when they run.
if TYPE_CHECKING:
    from agents.config import TaskConfig
    from agents.prompt_agent import PromptAgent
    from envs import EnvConfig, PointPromptEnv
    from experiments.benchmark.results import MethodResult
    from segmenter import EmbeddingCache, ImageEmbedding, Segmenter

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "METHOD_GROUPS",
    "MethodContext",
    "MethodGroup",
    "MethodOptions",
    "agent_cost",
    "agent_policy",
    "register_method",
]


@dataclass(frozen=True)
class MethodOptions:
    """What the benchmark runs besides the agents, and how (picklable, for workers)."""

    want: tuple[str, ...]
    seed: int = 0
    manual_clicks: int = 20
    abstain_margin: float | None = None
    finetuned: tuple[str, ...] = ()
    finetuned_agent: bool = True  # the (c) row: the agent prompting each fine-tuned decoder
    amg_points_per_side: int = 32
    amg_tune_images: int = 10
    progress: bool = True


@dataclass
class MethodContext:
    """What every method sees: one worker's share of the benchmark.

    Attributes:
        task: The task (data splits and segmenter).
        samples: Every benchmark image (environments address them by global index).
        indices: The images of this share.
        embeddings: Cached embedding of each image of the share, by index.
        gts: ``(H, W)`` bool ground truth of each image of the share, by index.
        cache: The embedding cache.
        segmenter: The frozen segmenter.
        ref: The reference (first) agent: its SRM labels and its env settings are the fixed
            policies'.
        config: The env settings of the fixed policies (the reference agent's, evaluation).
        options: The benchmark's options.
        results: Rows appended by the methods, in order.
    """

    task: TaskConfig
    samples: Sequence[Any]
    indices: list[int]
    embeddings: dict[int, ImageEmbedding]
    gts: dict[int, np.ndarray]
    cache: EmbeddingCache
    segmenter: Segmenter
    ref: PromptAgent
    config: EnvConfig
    options: MethodOptions
    results: list[MethodResult] = field(default_factory=list)

    def env_method(
        self,
        name: str,
        policy: Any,
        labeler: Any,
        steps: int | None = None,
        env_config: EnvConfig | None = None,
        segmenter: Segmenter | None = None,
    ) -> MethodResult:
        """Run a click policy (a name of :data:`agents.clickers.POLICIES` or a policy function)
        in the prompting environment on every image of the share and append its row."""
        from agents.clickers import EnvClicker
        from envs import PointPromptEnv
        from experiments.benchmark.results import MethodResult

        seg = segmenter or self.segmenter
        env = PointPromptEnv(self.samples, seg, labeler, env_config or self.config, self.cache)
        clicker = EnvClicker(env, policy, seed=self.options.seed)
        res = MethodResult(name, "automatic")
        for i in progress_bar(
            self.indices, desc=name, unit="img", disable=not self.options.progress
        ):
            tr = clicker.run(i, steps)
            res.add_trace(tr, self.gts[i])
            res.curve.append(list(tr.ious))
            res.start_clicks = tr.start_clicks
        self.results.append(res)
        return res

    def lookahead_method(
        self,
        name: str,
        agent: Any,
        chooser: str = "judge",
        kind: str = "automatic",
        stop: bool | None = None,
        steps: int | None = None,
    ) -> MethodResult:
        """Run a lookahead agent (:class:`~agents.lookahead.LookaheadAgent`) with ``chooser``
        (``stop`` and ``steps``: default the agent's) on every image of the share and append
        its row."""
        from experiments.benchmark.results import MethodResult

        res = MethodResult(name, kind)
        for i in progress_bar(
            self.indices, desc=name, unit="img", disable=not self.options.progress
        ):
            s = self.samples[i]
            tr = agent.trace(
                self.embeddings[i], self.gts[i], str(s.id), s.load_image, chooser, steps, stop
            )
            res.add_trace(tr, self.gts[i])
            res.curve.append(list(tr.ious))
            res.start_clicks = tr.start_clicks
        self.results.append(res)
        return res

    def lookahead_agent(self) -> Any:
        """The reference agent if it looks ahead, else a lookahead agent on its SRM (no judge:
        for the oracle and agreement choosers)."""
        if looks_ahead(self.ref):
            return self.ref
        from agents.lookahead import LookaheadAgent

        return LookaheadAgent(self.segmenter, self.ref.srm, None, task=self.ref.task)


@dataclass(frozen=True)
class MethodGroup:
    """One entry of :data:`METHODS`.

    Attributes:
        name: What ``--methods`` calls it.
        help: One line for ``--help``.
        run: Appends the group's rows to the context.
        selectable: A ``--methods`` choice; ``False`` for a group that runs whenever its
            inputs are given (the fine-tuned deltas of ``--finetuned``).
    """

    name: str
    help: str
    run: Callable[[MethodContext], None]
    selectable: bool = True


#: Every method group by name, in the order they run (after the agents, before the annotator).
METHODS: dict[str, MethodGroup] = {}


def register_method(
    name: str, help: str, selectable: bool = True
) -> Callable[[Callable[[MethodContext], None]], Callable[[MethodContext], None]]:
    """Register ``fn(ctx)`` as the method group ``name`` (a decorator)."""

    def add(fn: Callable[[MethodContext], None]) -> Callable[[MethodContext], None]:
        if name in METHODS:
            raise ValueError(f"a benchmark method named {name!r} is registered already")
        METHODS[name] = MethodGroup(name, help, fn, selectable)
        return fn

    return add


def looks_ahead(agent: Any) -> bool:
    """Whether a reference agent is a lookahead agent (no PPO policy to ask for clicks)."""
    return getattr(agent, "kind", "ppo") == "lookahead"


def agent_policy(agent: PromptAgent) -> Callable[..., int]:
    """A trained agent as the click policy of :meth:`MethodContext.env_method`."""

    def policy(env: PointPromptEnv, obs: dict[str, np.ndarray], allowed: np.ndarray) -> int:
        return agent.act(env, obs)

    policy.__name__ = "agent_policy"
    return policy


def agent_cost(agent: PromptAgent, run: str | Path) -> tuple[float | None, int]:
    """Training wall time of a run over all its sessions (SRM pretraining and PPO; ``None`` for
    runs resumed before that total was recorded) and its learned parameters."""
    summary = Path(run) / "summary.json"
    seconds = (
        json.loads(summary.read_text()).get("train_seconds_total") if summary.is_file() else None
    )
    model = getattr(agent, "model", None)  # PPO; a lookahead agent has an SRM and a judge
    policy = sum(p.numel() for p in model.policy.parameters()) if model is not None else 0
    srm = sum(p.numel() for p in agent.srm.head.parameters())
    judge = getattr(agent, "judge", None)
    leaves = judge.leaves() if judge is not None else 0
    return seconds, int(policy + srm + leaves)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@register_method("wo_srm", "the agent with every click positive (the paper's w/o SRM)")
def wo_srm(ctx: MethodContext) -> None:
    from recalibration.labelers import PositiveWithMap

    if looks_ahead(ctx.ref):  # its labels are chosen by outcome, not read off the SRM
        logger.info("wo_srm: not defined for a lookahead agent; row left out")
        return
    positive = PositiveWithMap(ctx.ref.srm)
    ctx.env_method("agent w/o SRM (all positive)", agent_policy(ctx.ref), positive)


@register_method("single_step", "the SRM start and one agent click (the paper's single step)")
def single_step(ctx: MethodContext) -> None:
    if looks_ahead(ctx.ref):
        ctx.lookahead_method("agent single step", ctx.ref, steps=1)
        return
    ctx.env_method("agent single step", agent_policy(ctx.ref), ctx.ref.srm, steps=1)


@register_method("random", "random cells labelled by the agent's SRM (the paper's w/o RL)")
def random_clicks(ctx: MethodContext) -> None:
    ctx.env_method("random + SRM (w/o RL)", "random", ctx.ref.srm)


@register_method("heuristics", "centre spiral, spread grid and SRM-confident clicks, SRM labels")
def heuristics(ctx: MethodContext) -> None:
    ctx.env_method("centre + SRM", "centre", ctx.ref.srm)
    ctx.env_method("grid + SRM", "grid", ctx.ref.srm)
    ctx.env_method("SRM-confident", "srm_confident", ctx.ref.srm)


@register_method("start_only", "the SRM's two start points alone")
def start_only(ctx: MethodContext) -> None:
    ctx.env_method("SRM start only", "random", ctx.ref.srm, steps=0)


@register_method("oneshot", "PerSAM-style similarity points from 1 / all training images")
def oneshot(ctx: MethodContext) -> None:
    from agents.clickers import OneShotSimilarity
    from experiments.benchmark.results import MethodResult
    from experiments.train import load_train_split

    train = load_train_split(ctx.ref.task)  # the agent's own training images
    seg, cache = ctx.segmenter, ctx.cache
    refs = [(cache.get_or_encode(seg, s.load_image()), np.asarray(s.mask, bool)) for s in train]
    for name, fit in (
        ("one-shot similarity (1 ref)", lambda o: o.fit(*refs[0])),
        (f"few-shot similarity ({len(refs)} refs)", lambda o: o.fit_many(refs)),
    ):
        model = fit(OneShotSimilarity(seg))
        res = MethodResult(name, "automatic")
        for i in ctx.indices:
            s = ctx.samples[i]
            res.add_trace(model.run(ctx.embeddings[i], ctx.gts[i], s.id), ctx.gts[i])
        ctx.results.append(res)


@register_method(
    "finetuned",
    "fine-tuned segmenters of --finetuned: (a) no prompt, (b) SRM start, (c) agent on it",
    selectable=False,
)
def finetuned(ctx: MethodContext) -> None:
    for delta in ctx.options.finetuned:
        _finetuned_delta(ctx, delta)


def _finetuned_delta(ctx: MethodContext, delta: str | Path) -> None:
    """The automatic variants of one fine-tuned segmenter: (a) no prompt, (b) the SRM's start
    points and, for a decoder delta, (c) the reference agent prompting it."""
    from experiments.benchmark.results import MethodResult
    from experiments.finetune import read_summary
    from segmenter.finetune import apply_delta, load_delta

    level = load_delta(delta)["level"]
    tuned = apply_delta(copy.deepcopy(ctx.segmenter), delta)
    info = read_summary(delta)
    label = f"fine-tuned {level}"
    first = len(ctx.results)
    no_prompt = MethodResult(f"{label} (a) no prompt", "automatic")
    ctx.results.append(no_prompt)
    for i in progress_bar(
        ctx.indices, desc=no_prompt.name, unit="img", disable=not ctx.options.progress
    ):
        s = ctx.samples[i]
        emb = ctx.cache.get_or_encode(tuned, s.load_image())  # a decoder delta: the base's entry
        t0 = time.perf_counter()
        pred = tuned.decode(emb, np.zeros((0, 2)), np.zeros(0), return_full=True)
        no_prompt.add(s.id, pred.mask, s.mask, 0, time.perf_counter() - t0, 1)
    ref = ctx.ref
    if level == "decoder":  # the SRM and policy read the embeddings, which are unchanged
        ctx.env_method(f"{label} (b) SRM start points", "random", ref.srm, 0, None, tuned)
    if level == "decoder" and ctx.options.finetuned_agent:
        name = f"{label} (c) agent prompting it"
        if looks_ahead(ref):  # the same SRM, judge and settings, previewing on the tuned decoder
            from agents.lookahead import LookaheadAgent

            on_tuned = LookaheadAgent(tuned, ref.srm, ref.judge, ref.config, ref.task)
            ctx.lookahead_method(name, on_tuned)
        else:
            ctx.env_method(name, agent_policy(ref), ref.srm, None, ctx.config, tuned)
    for m in ctx.results[first:]:
        m.train_seconds = info.get("train_seconds")
        m.trainable_params = info.get("trainable_params")


@register_method(
    "lookahead_oracle",
    "lookahead candidates chosen by their true IoU (a ceiling: reads the ground truth)",
)
def lookahead_oracle(ctx: MethodContext) -> None:
    agent = ctx.lookahead_agent()
    # The ceiling knows when to stop too: it never commits a click that makes the mask worse.
    name = "lookahead, true-IoU judge (ceiling: reads GT)"
    ctx.lookahead_method(name, agent, "oracle", "oracle", stop=True)


@register_method("lookahead_agreement", "lookahead candidates chosen by soft Dice with the SRM map")
def lookahead_agreement(ctx: MethodContext) -> None:
    ctx.lookahead_method("lookahead, SRM-agreement judge", ctx.lookahead_agent(), "agreement")


@register_method("amg", "SAM's automatic mask generator, SRM pick and oracle pick")
def amg(ctx: MethodContext) -> None:
    """SAM's automatic mask generator, then the SRM's pick and the oracle pick. Its two filter
    thresholds are chosen on the first ``amg_tune_images`` ``val`` images (SRM pick mIoU)."""
    from agents.amg import AutoMaskGenerator, choose_thresholds, pick_by_foreground, pick_oracle
    from envs import PointPromptEnv
    from experiments.benchmark.results import MethodResult
    from experiments.train import load_split

    seg, cache, ref, config = ctx.segmenter, ctx.cache, ctx.ref, ctx.config
    points_per_side, progress = ctx.options.amg_points_per_side, ctx.options.progress
    tune_images = ctx.options.amg_tune_images
    thresholds, scores = (0.88, 0.95), {}
    if tune_images and ref.task.data.val:
        val = load_split(ref.task, "val")[:tune_images]
        loose = AutoMaskGenerator(
            seg, points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0
        )
        env = PointPromptEnv(val, seg, ref.srm, config, cache=cache)
        gens, fgs, embs = [], [], []
        for i in progress_bar(
            range(len(val)), desc="automatic masks: tune on val", unit="img", disable=not progress
        ):
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
    env = PointPromptEnv(ctx.samples, seg, ref.srm, config, cache=cache)
    what = f"automatic masks ({points_per_side}x{points_per_side}, iou>={thresholds[0]}, "
    what += f"stability>={thresholds[1]})"
    srm_pick = MethodResult(f"{what} + SRM pick", "automatic")
    oracle = MethodResult(f"{what} + oracle pick (ceiling: reads GT)", "oracle")
    srm_pick.trainable_params = oracle.trainable_params = 0
    for i in progress_bar(ctx.indices, desc="automatic masks", unit="img", disable=not progress):
        s, gt = ctx.samples[i], np.asarray(ctx.samples[i].mask, bool)
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
    ctx.results.extend([srm_pick, oracle])


#: The ``--methods`` choices (compatibility name of the selectable groups).
METHOD_GROUPS: tuple[str, ...] = tuple(name for name, g in METHODS.items() if g.selectable)
