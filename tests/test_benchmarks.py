"""``python -m benchmarks.run_all`` at toy size (``--quick``): the document's tables and plots, and that finished runs
are reused and an interrupted pretraining run is resumed, not restarted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from benchmarks import bench_finetune, bench_objectives, run_all
from medssl.engine.monitor import Monitor

METHODS = ("infoguided", "lewel", "msf", "pgssl")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    doc, work = root / "docs" / "benchmarks.md", root / "work"
    assert run_all.main(["--dim", "2", "--quick", "--out", str(doc), "--work", str(work), "--device", "cpu"]) == doc
    return doc, work


def _rows(text: str, heading: str) -> dict[str, list[str]]:
    """First cell -> the other cells of every table line below ``heading`` up to the next heading."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                              for line in section.splitlines() if line.startswith("| "))}


def test_document_has_every_table_and_plot(toy):
    doc, _ = toy
    text = doc.read_text()
    assert text.startswith("# Benchmarks (2D)") and "**Toy run (`--quick`)**" in text
    assert "`python -m benchmarks.run_all --dim 2 --quick --out " in text
    assert re.search(r"Machine: \d+ CPU cores .*torch \S+ with \d+ thread", text)
    assert "one machine" in text and "train.steps=2" in text  # honest about where and with what budget
    pretraining = _rows(text, "### Pretraining runs")
    assert all(pretraining[m][0] == "2" and "(trained)" in pretraining[m][-1] for m in METHODS)
    oneshot = _rows(text, "### One-shot landmarks")
    for label in (*METHODS, "random init", "NCC", "registration"):
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", oneshot[label][0]) and float(oneshot[label][-1]) > 0
    assert "**Segmentation (test Dice, HD95), 2D**" in text and "**Landmarks (test MRE, SDR), 2D**" in text
    finetune = [line for line in text.splitlines() if line.startswith("| 1 | ")]
    assert len(finetune) == 2 * 2  # seg + landmarks, N=1: the best one-shot objective and none
    best = min(METHODS, key=lambda m: float(oneshot[m][0].split(" ± ")[0]))
    assert {line.split("|")[2].strip() for line in finetune} == {best, "none"}
    assert set(_rows(text, "**Stage 2 on one-shot pseudo-labels")) == {"init", best}  # header + its rows
    assert re.search(rf"\| {best} \| stage 2 \(1 template \+ one-shot pseudo-labels\) \| \d+\.\d\d \|", text)
    seg_stage2 = text.split("**Stage 2 on propagated label maps (test mean Dice), 2D**", 1)[1].split("\n#", 1)[0]
    rows = {cells[1]: cells[2:] for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                              for line in seg_stage2.splitlines() if line.startswith(f"| {best} |"))}
    assert set(rows) == {"one-shot propagation (1 template, no training)",
                         "stage 2 (1 template + propagated label maps)", "supervised, N = 1"}
    assert all(re.fullmatch(r"0\.\d{3}|1\.000", cells[0]) for cells in rows.values())  # one seed: no ± SD
    seg_table = text.split("**Segmentation (test Dice, HD95), 2D**", 1)[1].split("**Landmarks", 1)[0]
    supervised_n1 = next(line for line in seg_table.splitlines() if line.startswith(f"| 1 | {best} |"))
    supervised_dice = float(supervised_n1.split("|")[3])  # the N = 1 run stage 2 takes its template from
    assert float(rows["supervised, N = 1"][0]) == pytest.approx(supervised_dice, abs=0.005)
    assert ("| method | D | patch | batch | s/step | floor s/step | ratio | teacher floor s/step | ratio to teacher floor "
            "| peak MiB |") in text
    assert set(_rows(text, "### Cost per pretraining step")) >= {*METHODS}
    profile = _rows(text, "### Where the time goes")
    for method in METHODS:  # phase shares of one profiled step add up, and its operators are named with shapes
        assert abs(sum(float(cell) for cell in profile[method][1:4]) - 100) <= 2
        assert re.search(r"\w+ \d+ % \(\d+x [\dx]+", profile[method][4])
    assert "### Scale" in text and "benchmarks/scale_3d.md" in text  # where bench_scale recorded its tables
    assert "| 2D 32x32 | symmetric |" in text
    assert float(_rows(text, "### One-shot seconds per image")["registration"][1]) == 1.0
    for stage in ("pretraining pgssl", "one-shot landmarks", "fine-tuning", "cost per step", "view generation"):
        assert stage in _rows(text, "## Time per stage")
    figures = re.findall(r"!\[[^]]*\]\(([\w/.]+\.png)\)", text)
    assert sorted(figures) == ["benchmarks/finetune.png", "benchmarks/oneshot_mre.png", "benchmarks/step_ratio.png"]
    for figure in figures:
        assert (doc.parent / figure).stat().st_size > 1000


def test_finetune_benchmark_can_leave_out_random_init(toy, tmp_path):
    """``bench_finetune --skip-random-init`` fine-tunes the checkpoints only (stage 2 needs no random init)."""
    _, work = toy
    checkpoint = sorted((work / "pretrain").glob("*_2d_*"))[0]
    out = tmp_path / "ft"
    bench_finetune.main(["--checkpoint", str(checkpoint), "--skip-random-init", "--dim", "2", "--subjects", "5",
                         "--test", "1", "--val", "1", "--labeled", "1", "--seeds", "0", "--tasks", "seg", "--out",
                         str(out), *run_all.BUDGETS[(2, True)].finetune, "train.device=cpu"])  # as the toy run
    assert sorted(path.name for path in (out / "runs").iterdir()) == [f"seg_{checkpoint.name}_n1_s0"]
    text = (out / "finetune_table.md").read_text()
    assert f"| 1 | {checkpoint.name} |" in text and "| none |" not in text
    with pytest.raises(SystemExit):  # nothing left to fine-tune
        bench_finetune.main(["--skip-random-init", "--out", str(tmp_path / "nothing")])


def test_speed_suite_alone_times_one_shot_matching(tmp_path):
    """``--suites speed`` without the quality suite times one-shot matching itself (embedding, NCC, registration)."""
    doc = tmp_path / "speed.md"
    run_all.main(["--dim", "2", "--quick", "--suites", "speed", "--methods", "msf", "--skip", "--out", str(doc),
                  "--work", str(tmp_path / "work"), "--device", "cpu"])
    text = doc.read_text()
    seconds = _rows(text, "### One-shot seconds per image")
    assert set(seconds) >= {"embedding", "NCC", "registration"} and seconds["registration"][1] == "1.0"
    assert all(float(seconds[label][0]) > 0
               for label in ("embedding", "network forward only", "NCC", "registration"))
    assert float(seconds["network forward only"][0]) < float(seconds["embedding"][0])  # a part of it
    assert re.search(r"- msf: step \d+\.\d{3}x its teacher floor \(target <= 1.15\): (met|not met)", text)
    assert re.search(r"One-shot embedding matching: \d+\.\dx faster than registration per 2D image \(target >= 30x\)"
                     r".* no matcher on this network and device can be more than \d+x faster", text)
    assert "msf" in _rows(text, "### Where the time goes") and "### One-shot landmarks" not in text


def test_cost_per_step_cases_run_in_their_own_process_on_a_chosen_device():
    """The isolated cases (each in a child process, as a full run_all measures them) take the ``torch.device`` that
    ``pick_device`` returns, and bring back the profile."""
    rows = bench_objectives.measure_all([2], torch.device("cpu"), steps=1, methods=["msf"], profile=True, overrides=[
        "network.channels=[4,8,8]", "train.batch_size=2", "data.patch_size=[32,32]"])
    assert [row["method"] for row in rows] == ["msf"] and rows[0]["step_s"] > 0 and rows[0]["profile"]["ops"]


def test_rerun_reuses_finished_runs(toy, tmp_path):
    doc_first, work = toy
    oneshot = _rows(doc_first.read_text(), "### One-shot landmarks")
    best = min(METHODS, key=lambda m: float(oneshot[m][0].split(" ± ")[0]))  # the one the first run fine-tuned
    doc = tmp_path / "again.md"
    run_all.main(["--dim", "2", "--quick", "--out", str(doc), "--work", str(work), "--suites", "quality",
                  "--methods", best, "--skip", "none", "ncc", "registration", "--device", "cpu"])
    text = doc.read_text()
    assert "(reused)" in _rows(text, "### Pretraining runs")[best][-1]
    assert "## Speed" not in text and set(_rows(text, "### One-shot landmarks")) == {"method", best}
    first = [line for line in doc_first.read_text().splitlines() if line.startswith(f"| 1 | {best} |")]
    assert len(first) == 2  # segmentation and landmarks
    assert [line for line in text.splitlines() if line.startswith(f"| 1 | {best} |")] == first  # scores.json reused


def test_interrupted_pretraining_resumes(tmp_path, monkeypatch):
    from medssl.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", spatial_dims=2, n_subjects=2)
    overrides = [*run_all.BUDGETS[(2, True)].pretrain, "train.steps=3", "train.checkpoint_every=1"]
    step = Monitor.step

    def interrupted(self, number, metrics, force=False):
        if number == 2:  # after the step-1 checkpoint (and its model.pt) was written
            raise KeyboardInterrupt
        step(self, number, metrics, force)

    monkeypatch.setattr(Monitor, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_all.pretrain_run("msf", 2, data, tmp_path / "work", overrides, "cpu")
    monkeypatch.setattr(Monitor, "step", step)
    resumed = run_all.pretrain_run("msf", 2, data, tmp_path / "work", overrides, "cpu")
    assert resumed["status"] == "resumed at step 1" and resumed["steps"] == 3
    again = run_all.pretrain_run("msf", 2, data, tmp_path / "work", overrides, "cpu")
    assert again["status"] == "reused" and again["run"] == resumed["run"]
    other = run_all.pretrain_run("msf", 2, data, tmp_path / "work", [*overrides, "train.lr=0.002"], "cpu")
    assert other["status"] == "trained" and other["run"] != resumed["run"]
