"""Semantic Recalibration Module (SRM): the learned labeler that decides each click's label.

The SRM predicts a foreground-probability map on the segmenter's embedding grid; the label of a
click is read from that map (``1`` when ``p >= threshold``). Two branches, as in AlignSAM:

* **implicit** (abstract targets: polyps, saliency, blur, glass): conv blocks on the state.
* **explicit** (nameable targets: "car", "shadow"): conv layers fusing the semantic state
  ``s_c = E * S`` (``S`` a CLIP-Surgery text similarity map) with ``s_t``, one self-attention
  layer over a pooled token grid, and two conv layers.

State. The paper's state is ``s_t = E * M`` (embedding times previous mask probability). With
``input_mode="paper"`` the head sees exactly that; with ``input_mode="full"`` (the default) it
sees ``concat(E, E * M, M)``. The paper's state is all zeros before the first decode, which is
exactly when the evaluation start (the SRM's most and least confident cells) is chosen, and it
hides everything outside the current mask; ``full`` keeps the image visible while still letting
the head use the segmenter's current mask.

Layout: :mod:`~recalibration.srm.config` (settings), :mod:`~recalibration.srm.heads`,
:mod:`~recalibration.srm.losses`, :mod:`~recalibration.srm.mask_states`, the labeler
(:mod:`~recalibration.srm.module`) with its training (:mod:`~recalibration.srm.training`) and
file format (:mod:`~recalibration.srm.persistence`), and the ONNX Runtime head
(:mod:`~recalibration.srm.fast_head`).

Cost. The first layer of every head is a 1x1 convolution of the state. Because ``M`` (and
``S``) are per-pixel scalars, ``W [E, E*M, M] = (W_a E) + M (W_b E) + w_c M``: the heavy
``C -> hidden`` projections of the frozen embedding depend on the image only and are cached
between steps until the weights change, so a step costs a few small convolutions on the
``He x We`` grid whatever ``C`` is.

Training. :meth:`SemanticRecalibrationModule.pretrain` fits the head offline on a few labelled
images (Dice + BCE against the ground truth on the grid, padding excluded) under realistic mask
states, with joint flip/rotation augmentation and early stopping on a validation set, then fits a
temperature/bias calibration of the logits on the validation set. During RL training episodes
(ground truth present) :meth:`after_step` takes ``q_steps`` optimizer steps on the current state
(Q = 1 implicit, 5 explicit in the paper).
"""

from recalibration.srm.config import SRMConfig, SRMTrainItem
from recalibration.srm.heads import ExplicitHead, ImplicitHead
from recalibration.srm.losses import dice_bce_loss
from recalibration.srm.mask_states import simulate_mask_states, synthetic_mask_state
from recalibration.srm.module import SemanticRecalibrationModule
from recalibration.srm.persistence import FORMAT_VERSION, SRMLoadError

__all__ = [
    "FORMAT_VERSION",
    "ExplicitHead",
    "ImplicitHead",
    "SRMConfig",
    "SRMLoadError",
    "SRMTrainItem",
    "SemanticRecalibrationModule",
    "dice_bce_loss",
    "simulate_mask_states",
    "synthetic_mask_state",
]
