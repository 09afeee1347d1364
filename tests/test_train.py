"""`alignsam train` on the tiny segmenter: finishes fast, checkpoints, resumes from its step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents.config import ConfigError, DataConfig, TaskConfig
from agents.prompt_agent import PromptAgent, latest_checkpoint, read_meta
from experiments.train import resolve_task, train
from recalibration.srm import SRMConfig


def test_train_writes_run_folder(first_run):
    summary, _ = first_run
    run = __import__("pathlib").Path(summary["run_dir"])
    assert run.name.startswith("tiny__ppo__0__")
    assert summary["steps"] == 64
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and read_meta(ckpt)["step"] == 64
    assert (run / "checkpoints" / "best" / "agent.zip").is_file()
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["name"] == "tiny"


def test_resume_continues_from_saved_step(first_run):
    summary, cache = first_run
    run = __import__("pathlib").Path(summary["run_dir"])
    meta_path = latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["task"]["total_timesteps"] = 96
    meta_path.write_text(json.dumps(meta))
    resumed = train(None, resume=run, cache_dir=cache, progress=False)
    assert resumed["steps"] == 96  # 64 done before + 32 more, not 96 from scratch
    assert read_meta(latest_checkpoint(run))["step"] == 96
    # The run's training time counts both sessions, not only the resumed one.
    assert resumed["start_step"] == 64
    before = meta["elapsed_seconds"]
    assert before > 0 and resumed["train_seconds_total"] >= before + resumed["learn_seconds"]


def test_agent_segments_an_image(first_run):
    summary, _ = first_run
    agent = PromptAgent.load(summary["run_dir"])
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    mask, clicks = agent.segment(image)
    assert mask.shape == (90, 120) and mask.dtype == bool
    assert clicks.shape == (2 + 4, 3)  # SRM start (+, -) then T = 4 agent clicks
    assert set(clicks[:, 2]) <= {0.0, 1.0}
    # a loaded (frozen) SRM runs its head through ONNX Runtime beside the fast decoder, checked
    # against torch on first use; the torch head gives the same clicks and mask
    assert agent.segmenter.backend == "onnx" and agent.srm.fast_head  # onnxruntime is a dependency
    assert agent.srm._fast_head.verified
    # and so does the policy (its actions are compared with SB3's in test_policy: this short
    # run's logits lie within ~1e-5 of each other, where float implementations may break ties
    # differently)
    assert agent.fast_policy and agent._fast_policy.verified
    agent.srm.use_fast_head(False)
    mask_torch, clicks_torch = agent.segment(image)
    assert np.array_equal(mask, mask_torch) and np.allclose(clicks, clicks_torch)
    assert not agent.use_fast_policy(False) and agent.segment(image)[0].shape == mask.shape


def test_fast_policy_follows_weights_and_falls_back(first_run, isolated_home, caplog):
    import torch

    from agents.fast_policy import OnnxPolicy
    from envs import PointPromptEnv

    summary, _ = first_run
    agent = PromptAgent.load(summary["run_dir"])
    image = np.random.default_rng(2).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    env = PointPromptEnv([_Image(image)], agent.segmenter, agent.srm, agent.eval_config())
    obs, _ = env.reset(options={"index": 0})
    fast = agent._fast_policy
    graphs = lambda: sorted((isolated_home / "onnx").glob("policy-*.onnx"))  # noqa: E731

    def torch_logits() -> np.ndarray:  # SB3's distribution holds log-probabilities
        with torch.no_grad():
            o, _ = agent.model.policy.obs_to_tensor(obs)
            return agent.model.policy.get_distribution(o).distribution.logits[0].numpy()

    def fast_logits() -> np.ndarray:
        return torch.log_softmax(torch.from_numpy(fast.logits(obs)), 0).numpy()

    agent.act(env, obs)
    assert fast.verified and len(graphs()) == 1
    np.testing.assert_allclose(fast_logits(), torch_logits(), atol=1e-4)
    # a weight change (an optimizer step, load_state_dict) is noticed before the next action
    with torch.no_grad():
        agent.model.policy.action_net.score[-1].bias.add_(1.0)
        agent.model.policy.action_net.score[0].weight.mul_(-1.0)
    np.testing.assert_allclose(fast_logits(), torch_logits(), atol=1e-4)
    assert not fast.verified and len(graphs()) == 2  # exported again, checked at the next act
    agent.act(env, obs)
    assert fast.verified and agent.fast_policy
    # a graph that disagrees with torch is switched off, and torch acts
    masks = env.action_masks() if agent.maskable else None
    kwargs = {} if masks is None else {"action_masks": masks}
    action = int(agent.model.predict(obs, deterministic=True, **kwargs)[0])
    fast.verified = False
    real = OnnxPolicy.logits
    wrong = lambda self, o: real(self, o) + np.arange(len(real(self, o)), dtype=np.float32)  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(OnnxPolicy, "logits", wrong)
        assert agent.act(env, obs) == action
    assert not agent.fast_policy and "fast path off" in caplog.text


class _Image:
    id = "image"
    mask = None

    def __init__(self, image: np.ndarray) -> None:
        self.image = image

    def load_image(self) -> np.ndarray:
        return self.image


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (2, 700), (700, 3)])
def test_agent_segments_degenerate_images(first_run, shape, faults):
    """1 x 1 and extreme aspect ratios: a mask of the image's size, clicks inside the image."""
    summary, _ = first_run
    agent = PromptAgent.load(summary["run_dir"])
    image = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    mask, clicks = agent.segment(image)
    assert mask.shape == shape and mask.dtype == bool
    assert (clicks[:, 0] >= 0).all() and (clicks[:, 0] <= shape[1]).all()
    assert (clicks[:, 1] >= 0).all() and (clicks[:, 1] <= shape[0]).all()
    faults.bad_input("agent.segment", f"{shape[0]} x {shape[1]} image")


def test_task_files_parse_and_reject_unknown_keys(tmp_path):
    for name in (
        "synthetic",
        "kvasir_polyp",
        "kvasir_polyp_hit",
        "kvasir_polyp_imitate",
        "camvid_car",
        "camvid_road",
    ):
        assert resolve_task(name).name == name
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {train: 'synthetic:train'}\nppo: {learning_rat: 1}\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        TaskConfig.load(bad)
    with pytest.raises(ConfigError, match="shipped tasks"):
        resolve_task("no_such_task")


def test_segment_writes_masks_coco_rle_and_summary(first_run, tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    from envs.data import DataError
    from experiments.segment import gather_inputs, segment_images

    summary, cache = first_run
    folder = tmp_path / "my images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8)).save(folder / "gray é.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    agent = PromptAgent.load(summary["run_dir"])
    samples = gather_inputs([str(folder), str(folder / "a.png")])
    assert sorted(s.id for s in samples) == ["a", "a__1", "broken", "gray é"]
    with pytest.raises(DataError, match="(?s)1 image.*broken.png.*--skip-bad"):
        segment_images(agent, samples, tmp_path / "out0", progress=False)
    assert not (tmp_path / "out0").exists()  # nothing half-done
    rep = segment_images(agent, samples, tmp_path / "out", skip_bad=True, progress=False)
    assert rep.images == 3 and [Path(s["id"]).name for s in rep.skipped] == ["broken.png"]
    assert rep.decoder_calls == 3 * (1 + 4)  # one decode for the SRM start, then T = 4 clicks
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "gray é.png"))
    assert mask.shape == (50, 40) and set(np.unique(mask)) <= {0, 255}
    assert (tmp_path / "out" / "overlays" / "a__1.png").is_file()
    coco = COCO(str(tmp_path / "out" / "results.json"))
    ann = coco.loadAnns(coco.getAnnIds())[1]
    img = coco.loadImgs(ann["image_id"])[0]
    assert img["file_name"] == "gray é.jpg" and img["mask_file"] == "masks/gray é.png"
    by_id = {i["mask_file"]: i["file_name"] for i in coco.dataset["images"]}
    assert by_id["masks/a__1.png"] == str((folder / "a.png").resolve())  # given as a file
    assert by_id["masks/a.png"] == "a.png"  # relative to the folder it came from
    np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask > 0)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == 3
    with pytest.raises(DataError, match="no such file"):
        gather_inputs([str(tmp_path / "missing.png")])


def test_benchmark_runs_every_method(first_run, tmp_path):
    from experiments.benchmark import run_benchmark

    summary, cache = first_run
    agent = PromptAgent.load(summary["run_dir"])
    from segmenter import EmbeddingCache

    res = run_benchmark(
        agent.task,
        [summary["run_dir"]],
        split="val",
        limit=3,
        out=tmp_path / "bench",
        cache=EmbeddingCache(cache),
        segmenter=agent.segmenter,
        manual_clicks=5,
        progress=False,
        amg_points_per_side=8,  # the generator itself is tested in test_finetune.py
        amg_tune_images=1,
    )
    rows = {r["method"]: r for r in res["methods"]}
    assert list(rows)[0] == "agent" and "diff_vs_agent" not in rows["agent"]
    for name in (
        "agent w/o SRM (all positive)",
        "random + SRM (w/o RL)",
        "SRM-confident",
        "one-shot similarity (1 ref)",
        "manual @5",
    ):
        assert rows[name]["n"] == 3 and len(rows[name]["diff_vs_agent"]) == 3
    assert rows["agent"]["clicks"] == 2 + 4  # SRM start + T
    assert rows["agent single step"]["clicks"] == 3
    assert rows["SRM start only"]["clicks"] == 2
    assert rows["manual @3"]["clicks"] <= 3
    assert "manual @10" not in rows  # beyond the 5-click budget
    m = res["manual"]
    assert set(m["miou_at_k"]) == {"1", "2", "3", "4", "5"} and 1 <= m["noc@90"] <= 5
    # The annotator's IoU after k clicks is what manual @k scored.
    assert rows["manual @5"]["iou"] == pytest.approx(m["miou_at_k"]["5"])
    # By click budget: the same-start, same-budget methods; the agent's last budget is its
    # final mask; the single-step ablation (a shorter trace) is left out.
    by = res["by_click"]
    assert by["clicks_after_start"] == [0, 1, 2, 3, 4]
    assert "agent single step" not in by["methods"] and "SRM-confident" in by["methods"]
    assert by["methods"]["agent"]["miou"][-1] == pytest.approx(rows["agent"]["iou"], abs=1e-6)
    rnd = by["methods"]["random + SRM (w/o RL)"]
    assert rnd["miou"][0] == pytest.approx(by["methods"]["agent"]["miou"][0])  # same start
    assert rnd["diff_vs_agent"][-1][0] == pytest.approx(
        rows["random + SRM (w/o RL)"]["diff_vs_agent"][0], abs=1e-6
    )
    out = tmp_path / "bench"
    assert json.loads((out / "results.json").read_text())["n_images"] == 3
    assert "| agent |" in (out / "results.md").read_text()
    assert "mIoU after k clicks past the start" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000 and (out / "examples.png").is_file()


def test_train_explicit_branch_with_tiny_clip(tiny_clip_arch, tiny_task, tmp_path):
    """The explicit SRM (CLIP map + attention head) through offline pretraining, PPO with
    online updates, checkpointing and automatic segmentation, with a random-init tiny CLIP."""
    from recalibration.clip_surgery import ClipSpec

    task = tiny_task(32)
    task.srm = SRMConfig(
        branch="explicit",
        text="spotted blob",
        clip=ClipSpec(arch=tiny_clip_arch, pretrained=None, allow_random=True),
        attn_grid=8,
    )
    summary = train(task, runs=tmp_path / "runs", cache_dir=str(tmp_path / "emb"), progress=False)
    assert summary["steps"] == 32
    agent = PromptAgent.load(summary["run_dir"])
    assert agent.srm.branch == "explicit" and agent.srm.clip is not None
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    mask, clicks = agent.segment(image)
    assert mask.shape == (64, 80) and clicks.shape == (2 + 4, 3)


def test_benchmark_agents_with_different_action_spaces(first_run, tiny_task, tmp_path):
    """A pass-action agent (G*G + 1 actions) beside a plain one, each in its own env settings."""
    import dataclasses

    from experiments.benchmark import run_benchmark
    from segmenter import EmbeddingCache

    summary, cache = first_run
    task = tiny_task(32)
    task.env = dataclasses.replace(task.env, allow_pass=True)
    passing = train(task, runs=tmp_path / "runs", cache_dir=cache, progress=False)
    res = run_benchmark(
        task,
        [summary["run_dir"], passing["run_dir"]],
        split="val",
        limit=2,
        out=tmp_path / "bench",
        cache=EmbeddingCache(cache),
        manual_clicks=3,
        methods=[],
        progress=False,
    )
    names = [r["method"] for r in res["methods"]]
    assert len([n for n in names if n.startswith("agent ")]) == 2
    assert names[2:] == ["manual @1", "manual @3"]


def test_train_split_subset_is_seeded_and_shared(tiny_task):
    """Training and the learning baselines (few-shot similarity) see the same subset."""
    from experiments.train import load_train_split

    task = tiny_task()
    task.data = DataConfig(train="synthetic:train", train_subset=5)
    first = [s.id for s in load_train_split(task)]
    assert len(first) == len(set(first)) == 5 and first == sorted(first)
    assert [s.id for s in load_train_split(task)] == first
    task.seed = 1
    assert [s.id for s in load_train_split(task)] != first
    task.data = DataConfig(train="synthetic:train")
    assert len(load_train_split(task)) == 24


def test_greedy_ceiling_picks_the_best_next_click(first_run):
    """Greedy's cell gives the best IoU of all legal cells after the same start (each checked
    by a fresh episode), and the ceiling report covers every policy."""
    from envs import PointPromptEnv
    from experiments.ceiling import greedy_action, placement_ceiling
    from experiments.datasets import load_dataset

    summary, _ = first_run
    agent = PromptAgent.load(summary["run_dir"])
    samples = list(load_dataset("synthetic:val"))[:2]
    env = PointPromptEnv(samples, agent.segmenter, agent.srm, agent.eval_config(), cache=None)
    env.reset(options={"index": 0})
    choice = greedy_action(env)
    ious = {}
    for cell in range(env.config.grid**2):
        env.reset(options={"index": 0})
        env.step(cell)
        ious[cell] = env.iou
    assert ious[choice] == max(ious.values())
    report = placement_ceiling(agent, samples, progress=False)
    assert report["n"] == 2 and set(report["mean_iou"]) == {"greedy", "agent", "random"}
    assert all(0.0 <= v <= 1.0 for v in report["mean_iou"].values())


def test_sweep_without_ray_runs_trials_in_order_and_checks_the_grid(tiny_task, tmp_path):
    import yaml

    from experiments.distributed import sweep

    task_file = tmp_path / "tiny.yaml"
    task_file.write_text(yaml.safe_dump(tiny_task(32).to_dict()))
    with pytest.raises(ValueError, match="ppo.nope: unknown key"):
        sweep([str(task_file)], [0], grid={"ppo.nope": [1]}, runs=tmp_path / "runs")
    rows = sweep(
        [str(task_file)],
        [0],
        grid={"ppo.learning_rate": [3e-4]},
        runs=tmp_path / "runs",
        name="local",
        cache_dir=str(tmp_path / "emb"),
    )
    (row,) = rows
    assert row["status"] == "TERMINATED" and row["steps"] == 32 and row["hp/ppo.learning_rate"]
    run = tmp_path / "runs" / "tiny__ppo__0__local_learning_rate=0.0003"
    assert row["run_dir"] == str(run) and latest_checkpoint(run) is not None
    assert json.loads((run / "config.json").read_text())["ppo"]["learning_rate"] == 3e-4
    assert json.loads((tmp_path / "runs" / "local.json").read_text()) == rows


def test_train_with_prior_scores_the_starting_heuristic(tiny_task, tmp_path):
    """``ppo.prior``: the untrained policy (the SRM-confident heuristic) is scored on val at
    step 0 before PPO, so best-on-val can keep it; the run reloads with its prior."""
    task = tiny_task(32)
    task.ppo.prior = "srm_confident"
    summary = train(task, runs=tmp_path / "runs", cache_dir=str(tmp_path / "emb"), progress=False)
    first = summary["history"][0]
    assert first["step"] == 0 and first["stage"] == "prior srm_confident"
    assert summary["best_val_miou"] >= first["val_miou"]
    agent = PromptAgent.load(summary["run_dir"])
    assert agent.model.policy.features_extractor.prior == "srm_confident"
