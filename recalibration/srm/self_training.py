"""Self-training of the SRM on images without labels (``alignsam adapt --self-train``).

The images a user segments are unlabelled but plentiful. Where the SRM is sure of a cell on an
image *and* on its mirror image (its map of the horizontally flipped image, flipped back), the
cell gets that label; every other cell is left out of the loss. The head is then fine-tuned on
batches half of these pseudo-labelled target images, half of labelled training images (their
features standardised with the training statistics, the target's with the target's), at a tenth
of the learning rate, so that it learns the target's look without drifting from what the labels
taught it. The judge and the value model are not refitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recalibration.srm.losses import dice_bce_loss, valid_mask
from recalibration.srm.training import PreparedItem
from segmenter.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["SURE", "labelled_item", "pseudo_item", "self_train"]

#: A cell is pseudo-labelled foreground when both maps give it at least ``SURE``, background
#: when both give it at most ``1 - SURE``.
SURE = 0.9


def _image_map(srm: Any, emb: Any, load_image: Callable[[], np.ndarray] | None) -> np.ndarray:
    """The SRM's start map (no mask yet) in original image pixels."""
    from recalibration.labelers import EpisodeState

    zeros = np.zeros(emb.grid_size, np.float32)
    state = EpisodeState(emb.image_hash, emb, zeros, load_image=load_image)
    grid = srm.predict(state)
    rows, cols = emb.valid_shape(emb.grid_size)
    t = torch.from_numpy(np.ascontiguousarray(grid[:rows, :cols], np.float32))[None, None]
    return F.interpolate(t, size=emb.original_size, mode="bilinear", align_corners=False)[0, 0]


def pseudo_item(
    srm: Any,
    emb: Any,
    load_image: Callable[[], np.ndarray],
    flipped: Any,
    load_flipped: Callable[[], np.ndarray],
    sure: float = SURE,
) -> tuple[PreparedItem, float]:
    """A training item of a target image whose labels are the cells the SRM is sure of on the
    image and on its mirror image (``flipped``: the embedding of ``image[:, ::-1]``); with the
    share of the image's cells it labels."""
    p = _image_map(srm, emb, load_image)
    q = _image_map(srm, flipped, load_flipped).flip(-1)
    fg = ((p >= sure) & (q >= sure)).numpy()
    bg = ((p <= 1 - sure) & (q <= 1 - sure)).numpy()
    gt = emb.to_frame(fg.astype(np.float32), emb.grid_size)
    valid = valid_mask(emb)
    known = (emb.to_frame((fg | bg).astype(np.float32), emb.grid_size) > 0.999) * valid
    item = PreparedItem(
        features=srm.input_features(emb, load_image)[0].detach().to("cpu"),
        gt_grid=torch.from_numpy(gt),
        valid=torch.from_numpy(known.astype(np.float32)),
        semantic=None,
    )
    return item, float(known.sum() / max(1.0, valid.sum()))


def labelled_item(
    srm: Any, emb: Any, mask: np.ndarray, load_image: Callable[[], np.ndarray]
) -> PreparedItem:
    """A labelled training image as the head reads it now (before the statistics change)."""
    return PreparedItem(
        features=srm.input_features(emb, load_image)[0].detach().to("cpu"),
        gt_grid=torch.from_numpy(emb.to_frame(np.asarray(mask, np.float32), emb.grid_size)),
        valid=torch.from_numpy(valid_mask(emb)),
        semantic=None,
    )


def self_train(
    srm: Any,
    labelled: Sequence[PreparedItem],
    pseudo: Sequence[PreparedItem],
    steps: int,
    *,
    batch_size: int = 8,
    lr_scale: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``srm``'s head for ``steps`` steps on batches half ``labelled``, half
    ``pseudo`` (with the usual mask states: none, or synthetic ones of the item's labels, and
    the dihedral augmentation). Returns each step's loss."""
    if not pseudo or not labelled:
        raise ValueError("self-training needs pseudo-labelled and labelled images")
    srm._weights_will_change("self-training")
    rng = np.random.default_rng(seed)
    torch.manual_seed(int(rng.integers(2**31)))
    opt = srm._make_optimizer(srm.config.lr * lr_scale)
    half = max(1, batch_size // 2)
    losses = []
    srm.head.train()
    for _ in progress_bar(range(steps), desc="self-training", unit="step", disable=not progress):
        parts = [
            srm._batch(items, rng.integers(len(items), size=half), rng, True, 0.5, 0.5)
            for items in (labelled, pseudo)
        ]
        e, maps, tgt, valid = (torch.cat(t) for t in zip(*parts, strict=True))
        loss = dice_bce_loss(srm.head(e, maps), tgt, valid, srm.config.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    srm.head.eval()
    srm.optimizer = srm._make_optimizer(srm.config.lr)
    srm._touch()
    return losses
