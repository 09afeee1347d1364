"""An agent that sees what a click does: lookahead through the frozen decoder.

The decoder is a known, cheap model of the environment (~25 ms a call), so instead of choosing a
cell blind and reading its label off the SRM map, each step

1. proposes ``k`` cells: the unvisited cells where the SRM is sure and the mask disagrees with
   it (the SRM-confident score ``|p - 0.5| * |p - m|`` on the action grid);
2. decodes each with *both* labels against the current prompts and mask input
   (:meth:`segmenter.session.PromptSession.preview`: ``2k`` candidate masks);
3. lets a judge score the candidates (:class:`recalibration.judge.MaskJudge`, the predicted
   IoU; the SRM's label becomes one of the judge's inputs, not the decision) and commits the
   best one, with no further decoder call.

The current mask competes with the candidates (as "stay"): the episode stops when the judge
prefers it to every click (the learned stop). Other choosers run the same loop for the
benchmark's reference rows (:data:`CHOOSERS`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agents.answers import KEEPS, answers
from agents.clickers import ClickTrace, srm_confident_score
from envs.data import rgb_array
from recalibration.judge import JUDGE_FEATURES, MaskJudge, candidate_features
from recalibration.presence import PresenceGate, image_presence, initial_srm_map, nothing_here
from recalibration.srm import SemanticRecalibrationModule
from segmenter.base import ImageEmbedding, Segmenter, mask_iou
from segmenter.geometry import action_centres, to_grid
from segmenter.session import Outcome, PromptSession, Target

logger = logging.getLogger(__name__)

__all__ = [
    "CHOOSERS",
    "KEEPS",
    "LookaheadAgent",
    "LookaheadConfig",
    "LookaheadEpisode",
    "answers",
    "srm_embedding",
]

Chooser = Literal["judge", "oracle", "agreement", "heuristic"]
#: What picks among a step's candidates: the judge (the agent), the true IoU (a ceiling that
#: reads the ground truth), the soft Dice with the SRM map (a judge without learning) or the
#: SRM-confident heuristic (the first proposed cell with the SRM's label; never stops).
CHOOSERS: tuple[str, ...] = ("judge", "oracle", "agreement", "heuristic")
_DICE = JUDGE_FEATURES.index("soft_dice")
_MAP_AT_CLICK = JUDGE_FEATURES.index("map_at_click")


def _standardise(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit spread over a step's candidates (unchanged spread when all are equal)."""
    spread = float(values.std())
    return (values - values.mean()) / (spread if spread > 1e-9 else 1.0)


@dataclass
class LookaheadConfig:
    """Settings of the lookahead agent (``lookahead:`` in a task file).

    Attributes:
        steps: T, the most clicks after the two start points.
        proposals: k, cells proposed per step (each decoded with both labels: ``2k`` calls).
        grid: G of the action grid the cells are proposed on.
        stop: End the episode when the judge prefers the current mask to every candidate.
        folds: Cross-fitting folds of the SRM maps the judge is trained on.
        episodes: Judge-training episodes per training image and round.
        rounds: Judge-training rounds: round 0 follows the true IoU (with ``explore``), later
            rounds the judge fitted so far (DAgger), all data refitted each round.
        explore: Probability of a random candidate in the judge-training episodes.
        objective: The judge's LightGBM objective: ``lambdarank`` (the order of a state's
            candidates) or ``regression`` (their IoU).
        judge_images: Judge-training episodes per round run on a seeded sample of this many
            training images (a fresh sample each round), so the cost of a round does not grow
            with the training set (``None``: every image).
        keep: Which of the episode's states is the answer (:mod:`agents.answers`): ``last``
            (the mask after the last click), ``best_predicted`` (the state, the start
            included, whose mask the frozen decoder predicts the highest IoU for) or ``valued``
            (the state the value model fitted with the judge scores highest).
        margin: A scored ``keep`` answers with a clicked state only when its score beats the
            start's by more than this (else the start: a click must earn its place).
        veto: ``valued`` keeps a clicked state only when the decoder's predicted IoU for it is
            at least the start's minus this (:func:`agents.answers.answers`; ``None``: no veto).
        agreement: Weight of the SRM agreement (a candidate's soft Dice with the SRM map)
            added to the judge's score, both standardised over the step's candidates (0: the
            judge alone): a second opinion with errors of another kind.
        clicks: The clicks the agent takes after the start when it segments (``None``:
            ``steps``). The judge trains, and the ceiling rows run, on ``steps``.
        choose_clicks: Training sets ``clicks`` (0 to ``steps``) and ``keep`` to those whose
            answers score best on ``val`` (the fewest clicks and the task's ``keep`` on ties):
            the judge's last clicks may hurt more than they help. With ``max_worse`` also the
            rule's ``margin``, and only among the choices that leave at most this share of the
            ``val`` images worse than their start (:func:`agents.answers.best_answer`).
        max_worse: See ``choose_clicks`` (``None``: the best mean, however many are worse).
        choose_shifts: Shifts of ``val`` (``experiments.datasets.SHIFTS``: ``hue``, ``crop256``,
            ...) the choice is also made on (:func:`agents.answers.best_answer` over the sets).
    """

    steps: int = 8
    proposals: int = 5
    grid: int = 10
    stop: bool = True
    folds: int = 5
    episodes: int = 2
    rounds: int = 2
    explore: float = 0.3
    objective: Literal["regression", "lambdarank"] = "lambdarank"
    agreement: float = 0.0
    judge_images: int | None = None
    keep: Literal["last", "best_predicted", "valued"] = "last"
    margin: float = 0.0
    veto: float | None = None
    clicks: int | None = None
    choose_clicks: bool = False
    max_worse: float | None = None
    choose_shifts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.choose_shifts = tuple(self.choose_shifts)
        if self.steps < 0 or self.proposals < 1 or self.grid < 2:
            raise ValueError("lookahead: steps >= 0, proposals >= 1 and grid >= 2 needed")
        if self.folds < 2 or self.episodes < 1 or self.rounds < 1:
            raise ValueError("lookahead: folds >= 2, episodes >= 1 and rounds >= 1 needed")
        if self.judge_images is not None and self.judge_images < 1:
            raise ValueError(f"lookahead.judge_images must be >= 1, got {self.judge_images}")
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"lookahead.explore must lie in [0, 1], got {self.explore}")
        if self.agreement < 0:
            raise ValueError(f"lookahead.agreement must be >= 0, got {self.agreement}")
        if self.keep not in KEEPS:
            raise ValueError(f"lookahead.keep must be one of {KEEPS}, got {self.keep!r}")
        if min(self.margin, self.veto or 0.0) < 0 or not 0 <= (self.max_worse or 0.0) <= 1:
            raise ValueError("lookahead: margin >= 0, veto >= 0 and max_worse in [0, 1] needed")
        if self.clicks is not None and not 0 <= self.clicks <= self.steps:
            raise ValueError(f"lookahead.clicks must lie in [0, steps={self.steps}]: {self.clicks}")

    def default_steps(self, chooser: str = "judge") -> int:
        """Clicks of an episode with ``chooser`` when none are asked for: ``clicks`` for the
        agent's own judge, ``steps`` for the others (the ceilings keep the full budget)."""
        return self.clicks if chooser == "judge" and self.clicks is not None else self.steps


@dataclass
class LookaheadEpisode:
    """One lookahead episode on one image.

    Attributes:
        final: The outcome the episode ended on (its mask is the answer).
        clicks: ``(N, 3)`` ``(x, y, label)`` of the start points and every committed click.
        ious: Low-res IoU of the committed mask after the start and after each click (empty
            without ground truth).
        final_iou: Low-res IoU of ``final`` (``None`` without ground truth).
        scores: The chooser's score of staying, at each step.
        decoder_calls: Decoder calls of the episode (previews included).
        stopped: Steps taken before the stop rule ended the episode (``None``: ran all T).
        path: The start's outcome and each committed one, in order.
        kept: The index in ``path`` of the answer (``final``; the last unless ``keep`` undid
            clicks).
        answer_at: For each ``k``, the index in ``path`` of the answer had the episode ended
            after ``k`` clicks (under the episode's ``keep``).
        path_features: The judge's features of each state of ``path`` (``(len(path), F)``).
        values: The value model's score of each state of ``path`` (empty without one).
        states: Per step, ``(features (1 + 2k, F), true IoUs or None, IoU before)`` when
            recorded; row 0 is staying with the current mask.
        session: The prompting session the episode ended in (a person or the simulated
            annotator can go on clicking in it).
    """

    final: Outcome
    clicks: np.ndarray
    ious: list[float]
    final_iou: float | None
    scores: list[float]
    decoder_calls: int
    stopped: int | None
    path: list[Outcome] = field(default_factory=list)
    kept: int = -1
    answer_at: list[int] = field(default_factory=list)
    path_features: np.ndarray | None = None
    values: list[float] = field(default_factory=list)
    states: list[tuple[np.ndarray, np.ndarray | None, float]] = field(default_factory=list)
    session: PromptSession | None = field(default=None, repr=False)


def srm_embedding(
    srm: SemanticRecalibrationModule, segmenter: Segmenter, cache: Any, image: np.ndarray
) -> tuple[ImageEmbedding, float]:
    """``image``'s embedding as ``srm`` reads it (with the encoder's stages when its feature
    set wants them: one encoder pass for both), through ``cache`` when given; with the
    encoding's seconds (0 when the cache had it)."""
    t0 = time.perf_counter()
    hits = cache.hits if cache is not None else 0
    if srm.feature_set is not None:  # with the encoder's stages when they are needed
        emb = srm.feature_set.embed(image, cache)
    elif cache is not None:
        emb = cache.get_or_encode(segmenter, image)
    else:
        emb = segmenter.encode(image)
    cached = cache is not None and cache.hits > hits
    return emb, 0.0 if cached else time.perf_counter() - t0


class LookaheadAgent:
    """The lookahead agent: an SRM, a mask judge and the frozen segmenter.

    Args:
        segmenter: The frozen segmenter.
        srm: The trained SRM (its foreground map proposes cells and feeds the judge).
        judge: The fitted mask judge (``None`` for the ``oracle`` / ``agreement`` choosers).
        config: :class:`LookaheadConfig`.
        task: The task it was trained for (for run folders and ``segment``).
        cache: Embedding cache.
        value: The value model of ``keep: valued``.
    """

    kind = "lookahead"

    def eval_config(self, **changes: Any) -> Any:
        """The task's env settings for evaluation (the fixed click policies of a benchmark
        run in them with this agent's SRM)."""
        return self.task.eval_env(**changes)

    def __init__(
        self,
        segmenter: Segmenter,
        srm: SemanticRecalibrationModule,
        judge: MaskJudge | None,
        config: LookaheadConfig | None = None,
        task: Any = None,
        cache: Any = None,
        value: MaskJudge | None = None,
    ) -> None:
        self.segmenter, self.srm, self.judge = segmenter, srm, judge
        self.config = config or LookaheadConfig()
        self.task, self.cache = task, cache
        #: The run's "nothing here" threshold (``presence.json``), ``None`` when it has none.
        self.presence: PresenceGate | None = None
        #: The value model of ``keep: valued`` (``value.json``; :func:`agents.answers.fit_value`).
        self.value = value

    # -- one episode ---------------------------------------------------------------------------
    def srm_map(
        self, emb: ImageEmbedding, load_image: Callable[[], np.ndarray] | None = None
    ) -> np.ndarray:
        """``(He, We)`` SRM foreground map of the image before any click (0 on padding)."""
        return initial_srm_map(self.srm, self.segmenter, emb, load_image)

    def episode(
        self,
        emb: ImageEmbedding,
        load_image: Callable[[], np.ndarray] | None = None,
        gt: np.ndarray | None = None,
        *,
        chooser: Chooser = "judge",
        srm_map: np.ndarray | None = None,
        steps: int | None = None,
        stop: bool | None = None,
        explore: float = 0.0,
        rng: np.random.Generator | None = None,
        record: bool = False,
        score: Callable[[np.ndarray], np.ndarray] | None = None,
        agreement: float | None = None,
        keep: str | None = None,
    ) -> LookaheadEpisode:
        """Run one episode on ``emb``'s image.

        Args:
            emb: The image's embedding.
            load_image: Returns the image's pixels (feature sources not cached yet).
            gt: ``(H, W)`` bool ground truth: IoUs are reported, and the ``oracle`` chooser
                needs it.
            chooser: One of :data:`CHOOSERS`.
            srm_map: A given SRM map instead of the agent's (cross-fitted maps in training).
            steps: T (default :meth:`LookaheadConfig.default_steps` of ``chooser``).
            stop: Apply the stop rule (default ``config.stop``; not on an exploring step).
            explore: Probability of committing a random candidate instead (training).
            rng: Generator of ``explore``.
            record: Keep each step's candidate features and true IoUs (``states``).
            score: Scores candidates' features instead of the judge (training rounds).
            judge_images: Judge-training episodes per round run on a seeded sample of this many
            training images (a fresh sample each round), so the cost of a round does not grow
            with the training set (``None``: every image).
        agreement: Weight of the SRM agreement beside the judge (default
                ``config.agreement``).
            keep: Which state is the answer (:data:`KEEPS`, with ``config.margin``; default
                ``config.keep`` for the judge, ``last`` for the reference choosers: the
                ceiling's answer is its last state).
        """
        cfg = self.config
        steps = cfg.default_steps(chooser) if steps is None else int(steps)
        stop = cfg.stop if stop is None else stop
        agreement = cfg.agreement if agreement is None else float(agreement)
        keep = (cfg.keep if chooser == "judge" else "last") if keep is None else keep
        if keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
        if keep == "valued" and self.value is None:
            raise RuntimeError("keep='valued' needs the value model (value.json): train again")
        if chooser not in CHOOSERS:
            raise ValueError(f"chooser must be one of {CHOOSERS}, got {chooser!r}")
        if chooser == "judge" and score is None:
            if self.judge is None:
                raise RuntimeError("the judge chooser needs a fitted judge")
            score = self.judge.predict
        target = None if gt is None else Target.of(emb, gt, self.segmenter.low_res_size)
        if chooser == "oracle" and target is None:
            raise ValueError("the oracle chooser reads the ground truth: pass gt")
        s_map = self.srm_map(emb, load_image) if srm_map is None else srm_map
        he, we = emb.grid_size
        vh, vw = emb.valid_shape((he, we))
        session = PromptSession(self.segmenter, emb, target)
        sv = s_map[:vh, :vw]
        hi = np.unravel_index(np.argmax(sv), sv.shape)
        lo = np.unravel_index(np.argmin(sv), sv.shape)
        start = np.array([emb.cell_centre(*hi), emb.cell_centre(*lo)], np.float32)
        first = session.prompt(start, np.array([1, 0], np.int64))

        def choose(feats: np.ndarray, outs: list[Outcome]) -> np.ndarray:
            if chooser == "oracle":
                return np.array([o.iou for o in outs], np.float64)
            if chooser == "agreement":
                return feats[:, _DICE]
            if chooser == "heuristic":
                values = np.zeros(len(feats))
                values[1 if feats[1, _MAP_AT_CLICK] >= 0.5 else 2] = 1.0
                return values
            values = np.asarray(score(feats), np.float64)
            if agreement > 0:
                values = _standardise(values) + agreement * _standardise(feats[:, _DICE])
            return values

        last_click = (float(start[0][0]), float(start[0][1]), 1)
        last_map = float(s_map[hi])
        path = [first]
        path_feats = [
            candidate_features(first, s_map, (vh, vw), first.mask_prob, last_click, last_map)
        ]
        ious = [session.iou] if target is not None else []
        scores: list[float] = []
        centres = action_centres(emb.original_size, cfg.grid)
        p_grid = to_grid(sv, (cfg.grid, cfg.grid)).reshape(-1).astype(np.float64)
        visited = np.zeros(cfg.grid**2, bool)
        states: list[tuple[np.ndarray, np.ndarray | None, float]] = []
        stopped = None
        for t in range(steps):
            current = session.mask_prob
            m_grid = to_grid(current[:vh, :vw], (cfg.grid, cfg.grid)).reshape(-1)
            proposal = srm_confident_score(p_grid, m_grid.astype(np.float64))
            proposal[visited] = -np.inf
            cells = np.argsort(-proposal, kind="stable")[: cfg.proposals]
            clicks = [
                (float(centres[c][0]), float(centres[c][1]), label, int(c))
                for c in cells
                for label in (1, 0)
            ]
            # Candidate 0 is staying with the current mask: the judge stops by preferring it.
            outs = [session.outcome, *session.preview([(x, y, lab) for x, y, lab, _ in clicks])]
            feats = np.stack(
                [candidate_features(outs[0], s_map, (vh, vw), current, last_click, last_map)]
                + [
                    candidate_features(
                        o, s_map, (vh, vw), current, (x, y, lab), float(s_map[emb.cell_at(x, y)])
                    )
                    for (x, y, lab, _), o in zip(clicks, outs[1:], strict=True)
                ]
            )
            values = choose(feats, outs)
            scores.append(float(values[0]))
            if record:
                true = np.array([o.iou for o in outs]) if target is not None else None
                states.append((feats, true, session.iou if target is not None else 0.0))
            j = int(np.argmax(values))
            if rng is not None and explore > 0 and rng.random() < explore:
                j = 1 + int(rng.integers(len(clicks)))
            elif j == 0 and stop:
                stopped = t
                break
            elif j == 0:  # no stopping: the best of the clicks
                j = 1 + int(np.argmax(values[1:]))
            x, y, lab, cell = clicks[j - 1]
            visited[cell] = True
            session.commit(outs[j])
            path.append(outs[j])
            path_feats.append(feats[j])
            last_click, last_map = (x, y, lab), float(s_map[emb.cell_at(x, y)])
            if target is not None:
                ious.append(session.iou)
        feats_arr = np.stack(path_feats)
        values = [] if self.value is None else self.value.predict(feats_arr).tolist()
        decoder = [o.prediction.score for o in path]
        scored = decoder if keep == "best_predicted" else values or None
        answer_at = answers(scored, keep, cfg.margin, len(path), decoder, cfg.veto)
        kept = answer_at[-1]
        for _ in range(len(path) - 1 - kept):  # back to the kept state: no decoder call
            session.undo()
        clicks_arr = np.concatenate(
            [session.points, session.labels[:, None].astype(np.float32)], axis=1
        )
        return LookaheadEpisode(
            final=session.outcome,
            clicks=clicks_arr,
            ious=ious,
            final_iou=ious[kept] if ious else None,
            scores=scores,
            decoder_calls=session.decoder_calls,
            stopped=stopped,
            path=path,
            kept=kept,
            answer_at=answer_at,
            path_features=feats_arr,
            values=values,
            states=states,
            session=session,
        )

    # -- what users call -----------------------------------------------------------------------
    def _embedding(self, image: np.ndarray) -> tuple[ImageEmbedding, float]:
        return srm_embedding(self.srm, self.segmenter, self.cache, image)

    def segment(
        self, image: Any, steps: int | None = None, return_session: bool = False
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, PromptSession]:
        """Segment one image (an ``(H, W, 3)`` uint8 RGB array, a PIL image or a path) with no
        human input: ``(H, W)`` bool mask and ``(N, 3)`` clicks ``(x, y, label)`` (the two start
        points first); with ``return_session`` also the
        :class:`~segmenter.session.PromptSession` it ended in, where a person's clicks
        (``click(x, y, label)``, ``undo()``) continue from the agent's prompts and mask."""
        out = self.segment_detailed(image, steps)
        if return_session:
            return out["mask"], out["clicks"], out["session"]
        return out["mask"], out["clicks"]

    def segment_detailed(
        self, image: Any, steps: int | None = None, presence_threshold: float | None = None
    ) -> dict[str, Any]:
        """:meth:`segment` plus ``score`` (the value model's predicted IoU of the answer; the
        judge's last score of staying for a run without one),
        ``presence`` (:func:`~recalibration.presence.presence_score`), ``no_target``,
        ``encode_seconds``, ``decoder_calls`` and ``session``. An image whose presence score
        is below ``presence_threshold`` gets an empty mask and no clicks without an episode
        (:func:`~recalibration.presence.nothing_here`)."""
        image = rgb_array(image)
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0 (agent clicks), got {steps}")
        emb, encode_seconds = self._embedding(image)
        s_map = self.srm_map(emb, lambda: image)
        presence = image_presence(self.presence, s_map, emb)
        if presence_threshold is not None and presence < presence_threshold:
            return nothing_here(image.shape[:2], presence, encode_seconds)
        ep = self.episode(emb, lambda: image, steps=steps, srm_map=s_map)
        return {
            "mask": self.segmenter.upscale(emb, ep.final.logits),
            "clicks": ep.clicks,
            "score": ep.values[ep.kept] if ep.values else (ep.scores or [0.0])[-1],
            "presence": presence,
            "no_target": False,
            "encode_seconds": encode_seconds,
            "decoder_calls": ep.decoder_calls,
            "stopped": ep.stopped,
            "session": ep.session,
        }

    def trace(
        self,
        emb: ImageEmbedding,
        gt: np.ndarray,
        sample_id: str,
        load_image: Callable[[], np.ndarray] | None = None,
        chooser: Chooser = "judge",
        steps: int | None = None,
        stop: bool | None = None,
    ) -> ClickTrace:
        """One episode as a benchmark :class:`~agents.clickers.ClickTrace`: ``ious`` are the
        full-resolution IoUs of the committed mask after the start (for both start points) and
        after each click, padded with the final mask's IoU up to ``T`` clicks when the episode
        stopped early (``stop``: the stop rule, default ``config.stop``)."""
        t0 = time.perf_counter()
        ep = self.episode(emb, load_image, gt, chooser=chooser, steps=steps, stop=stop)
        steps = self.config.default_steps(chooser) if steps is None else int(steps)
        final_mask = self.segmenter.upscale(emb, ep.final.logits)
        path = [mask_iou(self.segmenter.upscale(emb, o.logits), gt) for o in ep.path]
        path = [path[i] for i in ep.answer_at]  # the answer after k clicks
        ious = [path[0]] * 2 + path[1:]
        ious += [ious[-1]] * (steps + 2 - len(ious))  # stopped early: the mask stays
        points, labels = ep.clicks[:, :2], ep.clicks[:, 2].astype(np.int64)
        return ClickTrace(
            sample_id=sample_id,
            points=points.astype(np.float32),
            labels=labels,
            ious=ious,
            final_mask=final_mask,
            decoder_calls=ep.decoder_calls,
            seconds=time.perf_counter() - t0,
            start_clicks=2,
            info={"chooser": chooser, "stopped": -1 if ep.stopped is None else ep.stopped},
        )

    # -- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``srm.pt``, ``judge.json``, ``value.json`` (when fitted) and
        ``lookahead.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.srm.save(folder / "srm.pt")
        if self.judge is not None:
            self.judge.save(folder / "judge.json")
        if self.value is not None:
            self.value.save(folder / "value.json")
        (folder / "lookahead.json").write_text(json.dumps(asdict(self.config), indent=2))
        return folder
