"""``python -m namm_transfer.video.train`` on a tiny budget: the projector stage trains only the projector, the
tower stage the tower too, the language model never changes; a run stopped by its time limit resumes to the same
end; the saved parts reload; ``best/`` holds the evaluation with the highest held-out accuracy, across a resume; bad
settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from namm_transfer.evals.video_tasks import TaskConfig, make_task
from namm_transfer.video import train as train_module
from namm_transfer.video.lora import LORA_SUFFIXES, LoraConfig
from namm_transfer.video.model import load_embedded_video_model, trained_state
from namm_transfer.video.train import (
    BEST_DIR,
    DESCRIBE_QUESTION,
    LOG_FILE,
    STATE_FILE,
    TrainConfig,
    accuracy_by_kind,
    example_frames,
    learning_rate,
    main,
    make_example,
    needle_list,
    stage_of,
)


def test_config_schedule_and_examples():
    config = TrainConfig(projector_steps=10, tower_steps=20, warmup=2, frames=(16, 32))
    assert learning_rate(0, config) == pytest.approx(config.projector_lr / 2)
    assert learning_rate(9, config) == pytest.approx(0.1 * config.projector_lr)
    assert learning_rate(10, config) == pytest.approx(config.tower_lr / 2)  # stage 2 restarts the warm-up
    assert {example_frames(config, i) for i in range(40)} == {16, 32}
    assert [example_frames(config, i) for i in range(8)] == [example_frames(config, i) for i in range(8)]
    for bad in ({"frames": (8,)}, {"batch_size": 0}, {"projector_steps": 0, "tower_steps": 0}, {"tower_lr": 0.0}):
        with pytest.raises(ValueError, match="invalid TrainConfig"):
            TrainConfig(**bad)


def test_describe_examples_list_every_needle_in_order():
    video = load_embedded_video_model(seed=0)
    task, _ = make_task("train", "count", 16, 0, TaskConfig(size=video.vision.image_size))  # index 2: count, item 0
    needles = sorted(task.needles, key=lambda n: n.start)
    assert needle_list(task) == ", then ".join([f"a {needles[0].colour} {needles[0].shape}"] * len(needles))
    example = make_example(video, "train", 2, 16, describe=True)
    assert (example.input_ids == video.model.config.video_token_id).sum() == 16 * 16
    assert video.tokenizer.decode(example.target_ids) == needle_list(task) + video.tokenizer.eos_token
    prompt = video.tokenizer.decode(example.input_ids[:-len(example.target_ids)])
    assert DESCRIBE_QUESTION in prompt and task.question not in prompt
    with pytest.raises(ValueError, match="not both"):
        make_example(video, "train", 2, 16, text=True, describe=True)


def test_tiny_run_trains_the_vision_parts_only_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    video = load_embedded_video_model(seed=0)
    before = {k: v.clone() for k, v in trained_state(video.model).items()}
    language = {k: v.clone() for k, v in video.model.model.language_model.state_dict().items()}
    example = make_example(video, "train", 5, 16)
    assert (example.input_ids == video.model.config.video_token_id).sum() == 16 * 16
    assert example.target_ids[-1] == video.tokenizer.eos_token_id
    args = ["--out", str(out), "--projector-steps", "1", "--tower-steps", "1", "--batch-size", "1", "--frames", "16",
            "--eval-items", "1", "--warmup", "1", "--save-every", "1"]
    assert main(args + ["--max-minutes", "0"]) == 0  # stops, saved, after the first step
    assert [json.loads(line)["step"] for line in (out / LOG_FILE).read_text().splitlines()] == [1]
    after_one = load_embedded_video_model(out)
    changed = {k for k, v in trained_state(after_one.model).items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)  # stage 1: projector
    assert main(args + ["--resume"]) == 0
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and [r["stage"] for r in log] == ["projector", "joint"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and 0.0 <= log[-1]["heldout_accuracy"] <= 1.0
    assert log[-1]["heldout_accuracy_by_kind"] == {"colour": log[-1]["heldout_accuracy"]}  # one item: kind 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    final = load_embedded_video_model(out)
    assert any(not torch.equal(v, before[k]) for k, v in trained_state(final.model).items()
               if k.startswith("model.vision_tower."))  # stage 2 moved the tower
    for name, tensor in final.model.model.language_model.state_dict().items():
        assert torch.equal(tensor, language[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["steps_done"] == 2 and config["provenance"]["command"].startswith("python -m")
    assert (out / STATE_FILE).is_file()


def test_best_folder_keeps_the_evaluation_with_the_highest_heldout_accuracy(tmp_path, monkeypatch):
    scripted = iter([0.5, 0.75, 0.25])  # the held-out accuracies of steps 1, 2 and 3
    monkeypatch.setattr(train_module, "_evaluate", lambda *args: {"heldout_accuracy": next(scripted)})
    out = tmp_path / "run"
    args = ["--out", str(out), "--projector-steps", "3", "--tower-steps", "0", "--batch-size", "1", "--frames", "16",
            "--warmup", "1", "--eval-every", "1", "--save-every", "1"]
    assert main(args + ["--max-minutes", "0"]) == 0  # stops after step 1
    best = out / BEST_DIR
    assert json.loads((best / "config.json").read_text())["provenance"]["steps_done"] == 1
    step_one = {k: v.clone() for k, v in trained_state(load_embedded_video_model(best).model).items()}
    assert main(args + ["--resume"]) == 0  # steps 2 (0.75, the best) and 3 (0.25)
    provenance = json.loads((best / "config.json").read_text())["provenance"]
    assert provenance["steps_done"] == 2 and provenance["last"]["heldout_accuracy"] == 0.75
    assert [json.loads(line)["step"] for line in (best / LOG_FILE).read_text().splitlines()] == [1, 2]
    best_parts = trained_state(load_embedded_video_model(best).model)
    final_parts = trained_state(load_embedded_video_model(out).model)
    projector = [k for k in best_parts if k.startswith("model.multi_modal_projector.")]
    assert projector and all(not torch.equal(best_parts[k], step_one[k]) for k in projector)  # step 2's, not 1's
    assert all(not torch.equal(best_parts[k], final_parts[k]) for k in projector)  # nor the last step's


def test_accuracy_by_kind_follows_the_task_index_not_the_position():
    overall, by_kind = accuracy_by_kind(range(65, 70), [True, False, True, False, True])  # kinds 1, 2, 3, 0, 1
    assert overall == pytest.approx(0.6)
    assert by_kind == {"colour": 0.0, "shape": 1.0, "count": 0.0, "order": 1.0}
    with pytest.raises(ValueError):
        accuracy_by_kind(range(4), [True])


def test_resume_needs_a_saved_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_state.pt"):
        main(["--out", str(tmp_path), "--resume"])


def test_text_stage_trains_only_the_adapters_on_text(tmp_path):
    with pytest.raises(ValueError, match="need lora_rank"):
        TrainConfig(text_steps=5)
    config = TrainConfig(text_steps=4, projector_steps=2, tower_steps=2, warmup=1, lora_rank=2)
    assert [stage_of(step, config) for step in range(8)] == ["text"] * 4 + ["projector"] * 2 + ["joint"] * 2
    assert learning_rate(0, config) == pytest.approx(config.text_lr)
    assert learning_rate(4, config) == pytest.approx(config.projector_lr)
    out = tmp_path / "run"
    fresh = load_embedded_video_model(seed=0, lora=LoraConfig(rank=2), merge=False)
    vision_before = {k: v.clone() for k, v in trained_state(fresh.model).items() if not k.endswith(LORA_SUFFIXES)}
    args = ["--out", str(out), "--text-steps", "1", "--projector-steps", "0", "--tower-steps", "0", "--lora-rank", "2",
            "--batch-size", "1", "--frames", "16", "--eval-items", "1", "--warmup", "1"]
    assert main(args) == 0
    record = json.loads((out / LOG_FILE).read_text().splitlines()[-1])
    assert record["stage"] == "text" and 0.0 <= record["heldout_text_accuracy"] <= 1.0
    trained = load_embedded_video_model(out, merge=False)
    state = trained_state(trained.model)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if k.endswith(".lora_b"))
    for name, tensor in vision_before.items():
        assert torch.equal(state[name], tensor), name  # the vision parts did not move
    base = {k: v for k, v in trained.model.model.language_model.state_dict().items() if not k.endswith(LORA_SUFFIXES)}
    for name, tensor in fresh.model.model.language_model.state_dict().items():
        if not name.endswith(LORA_SUFFIXES):
            assert torch.equal(base[name], tensor), name  # nor did the language model's own weights


def test_vision_stage_trains_the_tower_alone_and_a_resume_cuts_the_log(tmp_path):
    config = TrainConfig(vision_steps=3, text_steps=0, projector_steps=1, tower_steps=1, warmup=1)
    assert [stage_of(step, config) for step in range(5)] == ["vision"] * 3 + ["projector", "joint"]
    assert learning_rate(0, config) == pytest.approx(config.vision_lr)
    out = tmp_path / "run"
    fresh = load_embedded_video_model(seed=0)
    before = {k: v.clone() for k, v in trained_state(fresh.model).items()}
    args = ["--out", str(out), "--vision-steps", "2", "--vision-videos", "2", "--projector-steps", "0",
            "--tower-steps", "0", "--frames", "16", "--eval-items", "2", "--warmup", "1", "--save-every", "1"]
    assert main(args + ["--max-minutes", "0"]) == 0  # saved after step 1
    state = torch.load(out / STATE_FILE, weights_only=False)
    for added_later in ("describe_steps", "describe_lr"):  # a state saved before these settings existed
        del state["config"][added_later]
    torch.save(state, out / STATE_FILE)
    saved = json.loads((out / LOG_FILE).read_text())
    (out / LOG_FILE).write_text(json.dumps({**saved, "seconds": 1000.0}) + "\n"  # as if step 1 had taken 1000 s
                                + json.dumps({"step": 2, "stage": "vision", "loss": 0.0}) + "\n")  # killed after
    assert main(args + ["--resume"]) == 0
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and {r["stage"] for r in log} == {"vision"}
    assert log[1]["seconds"] > 1000.0  # the clock goes on from the saved step
    assert log[-1]["loss"] > 0 and 0.0 <= log[-1]["heldout_colour_accuracy"] <= 1.0
    assert 0.0 <= log[-1]["heldout_shape_accuracy"] <= 1.0 and 0.0 <= log[-1]["colour_accuracy"] <= 1.0
    trained = trained_state(load_embedded_video_model(out).model)
    changed = {k for k, v in trained.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed)  # the tower alone


def test_caption_and_describe_stages_train_projector_and_adapters_from_another_runs_parts(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["--frames", "16", "--eval-items", "1", "--warmup", "1", "--lora-rank", "2", "--vision-videos", "1"]
    assert main(["--out", str(first), "--vision-steps", "1", "--projector-steps", "0", "--tower-steps", "0"] + base) == 0
    start = {k: v.clone() for k, v in trained_state(load_embedded_video_model(first, merge=False).model).items()}
    assert main(["--out", str(second), "--init-from", str(first), "--caption-steps", "1", "--describe-steps", "1",
                 "--projector-steps", "0", "--tower-steps", "0", "--eval-every", "1"] + base) == 0
    caption, describe = [json.loads(line) for line in (second / LOG_FILE).read_text().splitlines()]
    assert caption["stage"] == "caption" and caption["loss"] > 0
    assert 0.0 <= caption["heldout_caption_accuracy"] <= 1.0 and 0.0 <= caption["heldout_nothing_accuracy"] <= 1.0
    assert describe["stage"] == "describe" and describe["loss"] > 0
    assert 0.0 <= describe["heldout_describe_accuracy"] <= 1.0 and 0.0 <= describe["heldout_accuracy"] <= 1.0
    after = trained_state(load_embedded_video_model(second, merge=False).model)
    changed = {k for k, v in after.items() if not torch.equal(v, start[k])}
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.endswith(".lora_b") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)  # the tower is what the first run left
    provenance = json.loads((second / "config.json").read_text())["provenance"]
    assert provenance["init_from"]["folder"] == str(first)
    assert provenance["init_from"]["provenance"]["config"]["vision_steps"] == 1
