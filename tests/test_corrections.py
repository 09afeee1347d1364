"""``alignsam corrections``: the annotator's corrective clicks after automatic starts, and the
agent's session that a person can go on clicking in."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def agent(first_run):
    from agents.prompt_agent import PromptAgent
    from segmenter import EmbeddingCache

    summary, cache = first_run
    return PromptAgent.load(summary["run_dir"], cache=EmbeddingCache(cache))


def test_the_agent_returns_the_session_it_ended_in_and_a_person_goes_on_from_it(agent, rgb_image):
    mask, clicks, session = agent.segment(rgb_image, return_session=True)
    assert np.array_equal(session.current_mask(), mask)
    assert session.points.tolist() == clicks[:, :2].tolist()
    calls = session.decoder_calls
    session.click(3.0, 4.0, 0)
    assert session.decoder_calls == calls + 1 and len(session.points) == len(clicks) + 1
    session.undo()
    assert np.array_equal(session.current_mask(), mask)


def test_corrections_command_measures_noc_from_every_start_against_scratch(first_run, tmp_path):
    from experiments.cli import main

    summary, cache = first_run
    out = tmp_path / "corr"
    code = main(
        [
            "corrections",
            summary["run_dir"],
            "--split",
            "val",
            "--limit",
            "3",
            "--out",
            str(out),
            "--cache",
            cache,
            "--max-clicks",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["n_images"] == 3 and set(result["starts"]) == {"agent", "srm_start"}
    for entry in result["starts"].values():
        for h in ("keep", "mask", "prune"):
            row = entry[h]
            assert 0 <= row["noc@90"][0] <= 4 and row["noc@90"][1] <= row["noc@90"][2]
            assert len(row["clicks_saved_90"]) == 3
    # The summary is recomputed from the per-image records it wrote.
    from experiments.corrections import summarize_corrections

    again = summarize_corrections(result["per_image"], max_clicks=4)
    assert again["starts"]["agent"]["keep"]["noc@90"] == result["starts"]["agent"]["keep"]["noc@90"]
    per = result["per_image"][0]
    start_iou = per["starts"]["agent"]["start_iou"]
    ious = per["starts"]["agent"]["keep"]["ious"]
    assert start_iou >= 0.9 or len(ious) >= 1  # below the stop IoU the annotator clicks
    assert (out / "results.md").read_text().count("| the agent |") == 3
    assert (out / "corrections.png").stat().st_size > 10_000
