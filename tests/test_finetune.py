"""Fine-tuning baselines on the tiny segmenter: decoder / LoRA / full deltas, exact reloads,
resume, clear errors, and the benchmark's fine-tuned and automatic-mask methods."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from segmenter import build_segmenter
from segmenter.base import SegmenterError
from segmenter.finetune import (
    FinetuneConfig,
    FinetuneItem,
    Finetuner,
    apply_delta,
    jittered_box,
    load_delta,
    sample_point_sets,
)


def _items(seg, n: int, seed: int = 0) -> list[FinetuneItem]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        gt = np.zeros((48, 64), bool)
        gt[8 + i : 30, 10 : 40 + i] = True
        img[gt] = (img[gt] // 2 + 120).astype(np.uint8)
        out.append(FinetuneItem(f"s{i}", gt, embedding=seg.encode(img), image=img))
    return out


@pytest.fixture(scope="module")
def tiny():
    return build_segmenter("tiny", backend="torch")


def test_prompt_sampling_respects_the_mask():
    gt = np.zeros((40, 50), bool)
    gt[10:20, 5:30] = True
    pts, labels = sample_point_sets(gt, 50, np.random.default_rng(0))
    assert pts.shape[:2] == labels.shape and pts.shape[0] == 50
    real = labels >= 0
    xs, ys = pts[..., 0].astype(int), pts[..., 1].astype(int)
    assert np.array_equal(gt[ys[real], xs[real]], labels[real] == 1)
    assert (labels == 1).sum(1).min() >= 1 and (labels == 1).sum(1).max() <= 3
    assert (labels == 0).sum(1).max() <= 2
    _, lab_empty = sample_point_sets(np.zeros((8, 8), bool), 5, np.random.default_rng(0))
    assert not (lab_empty == 1).any() and (lab_empty == 0).any()
    box = jittered_box(gt, np.random.default_rng(1))
    assert box is not None and 0 <= box[0] < box[2] <= 50 and 0 <= box[1] < box[3] <= 40
    assert jittered_box(np.zeros((8, 8), bool), np.random.default_rng(1)) is None


def test_decoder_delta_learns_and_reloads_exactly(tiny, tmp_path):
    items = _items(tiny, 4)
    cfg = FinetuneConfig(level="decoder", epochs=6, lr=3e-3, patience=0)
    tuner = Finetuner(tiny, cfg, tmp_path / "ft")
    before = tuner.evaluate([tuner._prepare(it) for it in items])["val"]
    res = tuner.fit(items[:3], items[3:], progress=False)
    train_after = tuner.evaluate([tuner._prepare(it) for it in items[:3]])["val"]
    assert train_after > before + 0.05  # it learns the training images
    assert (
        res.trainable_params
        == sum(p.numel() for n, p in tiny.model.named_parameters() if n.startswith("mask_decoder."))
        + sum(p.numel() for p in tiny.model.prompt_encoder.point_embeddings.parameters())
        + 2 * 32
    )
    assert [h["epoch"] for h in res.history] == list(range(7))
    assert list((tmp_path / "ft" / "tb").glob("events.out.tfevents.*"))
    # The base is untouched; a reload of the delta gives the saved weights' masks exactly.
    assert tiny.variant is None and all(not p.requires_grad for p in tiny.model.parameters())
    best = load_delta(res.delta)["state"]
    tuner.model.load_state_dict(best, strict=False)
    a = apply_delta(copy.deepcopy(tiny), res.delta)
    b = apply_delta(copy.deepcopy(tiny), tmp_path / "ft")  # the folder works too
    assert a.model_id == b.model_id != tiny.model_id and a.embedding_id == tiny.embedding_id
    emb = items[0].embedding  # the base's embedding serves the decoder delta
    pts, lab = np.array([[20.0, 15.0], [50.0, 40.0]]), np.array([1, 0])
    pa, pb = (s.decode(emb, pts, lab, return_full=True) for s in (a, b))
    assert torch.equal(pa.low_res_logits, pb.low_res_logits)
    with torch.no_grad():
        p = tuner._prepare(items[0])
        own = tuner._decode(emb.features, p, pts[None].astype(np.float32), lab[None])
    torch.testing.assert_close(pa.low_res_logits, own[0, 0], rtol=0, atol=1e-5)
    # The fast path re-exports for the new weights and agrees with the reloaded stock path.
    fast = apply_delta(build_segmenter("tiny", backend="onnx"), res.delta)
    pf = fast.decode(emb, pts, lab, return_full=True)
    assert fast.backend == "onnx" and np.array_equal(pf.mask, pa.mask)


def test_finetune_resumes_after_the_last_epoch(tiny, tmp_path):
    items = _items(tiny, 3)
    cfg = FinetuneConfig(level="decoder", epochs=1, lr=1e-3, patience=0)
    first = Finetuner(tiny, cfg, tmp_path).fit(items[:2], items[2:], progress=False)
    cfg2 = FinetuneConfig(level="decoder", epochs=3, lr=1e-3, patience=0)
    resumed = Finetuner(tiny, cfg2, tmp_path).fit(items[:2], items[2:], resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history
    straight = Finetuner(tiny, cfg2, tmp_path / "straight").fit(
        items[:2], items[2:], progress=False
    )
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-4)
    bad = FinetuneConfig(level="decoder", epochs=3, lr=5e-3, patience=0)
    with pytest.raises(SegmenterError, match="other settings"):
        Finetuner(tiny, bad, tmp_path).fit(items[:2], items[2:], resume=True, progress=False)


@pytest.mark.parametrize("level", ["lora", "full"])
def test_encoder_levels_change_the_embeddings(tiny, tmp_path, level):
    items = _items(tiny, 2)
    cfg = FinetuneConfig(level=level, epochs=1, lr=1e-2, patience=0, lora_rank=2)
    tuner = Finetuner(tiny, cfg, tmp_path)
    res = tuner.fit(items[:1], items[1:], progress=False)
    state = load_delta(res.delta)["state"]
    if level == "lora":
        assert any("lora_A" in k for k in state) and res.trainable_params < 30_000
    else:
        assert res.trainable_params == sum(p.numel() for p in tiny.model.parameters())
    # Save the last weights (not only the best) to see the encoder change through a reload.
    from segmenter.finetune import save_delta

    save_delta(tmp_path / "last.pt", tuner.model, cfg, tiny.model_id)
    seg = apply_delta(copy.deepcopy(tiny), tmp_path / "last.pt")
    assert seg.embedding_id == seg.model_id != tiny.embedding_id
    assert not any("lora" in n for n, _ in seg.model.named_parameters())  # merged
    emb = seg.encode(items[0].image)
    assert emb.model_id == seg.embedding_id
    assert not torch.allclose(emb.features, items[0].embedding.features)
    with pytest.raises(SegmenterError, match="re-encode"):
        seg.decode(items[0].embedding, np.array([[10.0, 10.0]]), np.array([1]))


def test_delta_errors_name_the_file_and_the_fix(tiny, tmp_path, faults):
    with pytest.raises(SegmenterError, match="does not exist.*alignsam finetune"):
        apply_delta(copy.deepcopy(tiny), tmp_path / "none.pt")
    faults.bad_input("finetune delta", "missing delta")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SegmenterError, match="junk.pt is unreadable"):
        apply_delta(copy.deepcopy(tiny), tmp_path / "junk.pt")
    faults.bad_input("finetune delta", "corrupt delta")
    items = _items(tiny, 2)
    res = Finetuner(tiny, FinetuneConfig(epochs=1), tmp_path / "ft").fit(
        items[:1], items[1:], progress=False
    )
    other = build_segmenter("tiny", backend="torch")
    other.model_id = other.embedding_id = "tiny:seed1"
    with pytest.raises(SegmenterError, match="trained on tiny:seed0"):
        apply_delta(other, res.delta)
    faults.bad_input("finetune delta", "delta of another base")
    tuned = apply_delta(copy.deepcopy(tiny), res.delta)
    with pytest.raises(SegmenterError, match="already carries a delta"):
        apply_delta(tuned, res.delta)
    with pytest.raises(ValueError, match="does not match its image"):
        bad = FinetuneItem("x", np.zeros((5, 5), bool), embedding=items[0].embedding)
        Finetuner(tiny, FinetuneConfig(epochs=1), tmp_path / "x").fit([bad], items[:1])
    faults.bad_input("finetune", "mask of the wrong size")


def test_cli_finetune_then_benchmark_with_baselines(first_run, tiny_task, tmp_path, capsys):
    """``alignsam finetune`` on the tiny task, then the benchmark's fine-tuned variants (a, b, c)
    and the automatic mask generator with its SRM and oracle picks."""
    from experiments.cli import main

    summary, cache = first_run
    import yaml

    task = tiny_task()
    task_file = tmp_path / "tiny.yaml"
    task_file.write_text(yaml.safe_dump(task.to_dict()))
    out = tmp_path / "ft"
    rc = main(
        [
            "finetune",
            str(task_file),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--cache",
            cache,
            "--no-progress",
            "--val-limit",
            "3",
        ]
    )
    assert rc == 0 and "trainable parameters" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["level"] == "decoder" and s["train_seconds"] > 0 and s["epochs_run"] == 2
    assert main(["finetune", str(task_file), "--out", str(out), "--cache", cache]) == 2  # exists
    seg_out = tmp_path / "seg"
    args = ["segment", summary["run_dir"], "synthetic:val", "--out", str(seg_out), "--delta"]
    assert main([*args, str(out), "--cache", cache, "--no-progress", "--no-overlays"]) == 0
    assert json.loads((seg_out / "summary.json").read_text())["images"] > 0

    from experiments.benchmark import run_benchmark
    from segmenter import EmbeddingCache

    res = run_benchmark(
        task,
        [summary["run_dir"]],
        split="val",
        limit=2,
        out=tmp_path / "bench",
        cache=EmbeddingCache(cache),
        manual_clicks=3,
        methods=["amg"],
        finetuned=[out],
        amg_points_per_side=4,
        amg_tune_images=2,
        progress=False,
    )
    names = [r["method"] for r in res["methods"]]
    assert len(names) == len(set(names))  # each method once
    rows = {r["method"]: r for r in res["methods"]}
    for name in (
        "fine-tuned decoder (a) no prompt",
        "fine-tuned decoder (b) SRM start points",
        "fine-tuned decoder (c) agent prompting it",
    ):
        assert rows[name]["n"] == 2 and rows[name]["trainable_params"] == s["trainable_params"]
    assert rows["fine-tuned decoder (b) SRM start points"]["clicks"] == 2
    assert rows["agent"]["train_seconds"] > 0 and rows["agent"]["trainable_params"] > 0
    (pick,) = [
        r
        for n, r in rows.items()
        if n.startswith("automatic masks (4x4, iou>=") and n.endswith("+ SRM pick")
    ]
    (oracle,) = [r for n, r in rows.items() if n.endswith("oracle pick (ceiling: reads GT)")]
    assert pick["decoder_calls"] == 16 and pick["n"] == oracle["n"] == 2
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "| training s | trainable params |" in md and "fine-tuned decoder (c)" in md


def test_mask_picks_and_threshold_choice():
    """The SRM pick unions the masks its map calls foreground; the oracle takes the best mask;
    the filter pair is chosen by the pick's IoU on held-out images."""
    from agents.amg import GeneratedMasks, choose_thresholds, pick_by_foreground, pick_oracle
    from segmenter.base import ImageEmbedding

    emb = ImageEmbedding(torch.zeros(1, 1, 8, 8), (32, 32), (32, 32), "x")
    gt = np.zeros((32, 32), bool)
    gt[:16, :16] = True
    a, b, c = (np.zeros((32, 32), bool) for _ in range(3))
    a[:16, :8], b[:16, 8:16], c[16:, 16:] = True, True, True
    fg = np.zeros((8, 8), np.float32)
    fg[:4, :4] = 0.9
    gen = GeneratedMasks([a, b, c], [0.95, 0.6, 0.9], [0.97, 0.97, 0.97], 1.0, 16)
    mask, used = pick_by_foreground(gen, fg, emb)
    assert used == [0, 1] and np.array_equal(mask, gt)
    best, idx = pick_oracle(gen, gt)
    assert idx in (0, 1) and np.array_equal(best, a if idx == 0 else b)
    none = GeneratedMasks([c], [0.9], [0.9], 1.0, 16)
    assert pick_by_foreground(none, fg, emb)[1] == [0]  # nothing reaches 0.5: the best one
    (pair, scores) = choose_thresholds([gen], [fg], [emb], [gt], ((0.88, 0.95), (0.5, 0.5)))
    assert pair == (0.5, 0.5) and scores["0.5/0.5"] == 1.0 and scores["0.88/0.95"] == 0.5
