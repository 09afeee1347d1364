"""Non-learned clickers that prompt the same frozen segmenter as the RL agent, for benchmarks.

Every clicker returns a :class:`ClickTrace`, so the benchmark can put them side by side on the
same images, the same cached embeddings and the same decoder:

* :class:`SimulatedAnnotator`: the interactive-segmentation field's simulated user (RITM's
  protocol, as used by SAM): each click at the point deepest inside the current error region.
  It reads the ground truth, so it is the *manual prompting* reference, not an automatic method.
  :func:`noc` and :func:`miou_at_k` are the field's metrics (NoC@85 / NoC@90, mIoU@k).
* :class:`EnvClicker`: a fixed click policy (random, centre spiral, spread grid, most confident
  labeler cells) run inside :class:`~envs.prompt_env.PointPromptEnv`, so the labels, the start
  prompts and the decoder path are exactly the agent's. ``random`` with the SRM labeler is the
  paper's "w/o RL" ablation.
* :class:`OneShotSimilarity`: a training-free one-shot baseline in the spirit of PerSAM (Zhang
  et al. 2023, "Personalize Segment Anything Model with One Shot"): points at the positions of
  the target image whose embedding is most / least similar to a target prototype taken from a
  reference image and its mask.

Coordinates follow the segmenter contract: points are ``(N, 2)`` ``(x, y)`` pixel coordinates in
the original image. A click on pixel ``(row, col)`` is placed at the pixel's centre
``(col + 0.5, row + 0.5)``, the convention of the environment's ground-truth start points.

Layout: traces and metrics (:mod:`~agents.clickers.trace`), the annotator
(:mod:`~agents.clickers.annotator`), named click policies and :class:`EnvClicker`
(:mod:`~agents.clickers.policies`), the one-shot baseline (:mod:`~agents.clickers.oneshot`).
"""

from agents.clickers.annotator import (
    HANDOVERS,
    SELECTIONS,
    Handover,
    Selection,
    SimulatedAnnotator,
    deepest_point,
)
from agents.clickers.oneshot import OneShotSimilarity, grid_to_pixel
from agents.clickers.policies import (
    CLICK_POLICIES,
    POLICIES,
    ClickPolicy,
    EnvClicker,
    PolicyFn,
    grid_order,
    register_click_policy,
    spiral_order,
    srm_confident_score,
)
from agents.clickers.trace import ClickTrace, miou_at_k, noc, noc_from, summarize

__all__ = [
    "CLICK_POLICIES",
    "HANDOVERS",
    "POLICIES",
    "SELECTIONS",
    "ClickPolicy",
    "ClickTrace",
    "EnvClicker",
    "Handover",
    "OneShotSimilarity",
    "PolicyFn",
    "Selection",
    "SimulatedAnnotator",
    "deepest_point",
    "grid_order",
    "grid_to_pixel",
    "miou_at_k",
    "noc",
    "noc_from",
    "register_click_policy",
    "spiral_order",
    "srm_confident_score",
    "summarize",
]
