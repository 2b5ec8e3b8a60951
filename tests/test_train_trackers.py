"""TrainConfig.report_to / Trainer.trackers: what log.jsonl holds reaches experiment trackers, through accelerate."""
import json
import os

import pytest
from accelerate.tracking import GeneralTracker
from train_fixtures import labelled_texts, model_dir, torch_kernels  # noqa: F401

from laet_fast.train.config import TrainConfig
from laet_fast.train.trainer import Trainer, tracker_scalars


class Recorder(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logs = None, []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))


def test_scalars_flatten_nested_entries_scores_and_selections():
    entry = {"step": 3, "loss": 0.5, "grad_norm": float("nan"), "eval": {"accuracy": 0.75, "head": {"accuracy": 1}},
             "layer_scores": {"grad_norm": [0.1, None, 0.3]}, "selection": [1, 3], "skipped": "text", "ok": True}
    flat = tracker_scalars(entry, num_layers=4)
    assert flat == {"step": 3, "loss": 0.5, "eval/accuracy": 0.75, "eval/head/accuracy": 1,
                    "layer_scores/grad_norm/0": 0.1, "layer_scores/grad_norm/2": 0.3, "selection/count": 2,
                    "selection/lowest": 1, "selection/block_0": 0, "selection/block_1": 1, "selection/block_2": 0,
                    "selection/block_3": 1, "ok": 1}
    assert tracker_scalars({"method": "laet", "head_hidden": [128, 64], "k": None}, keep_text=True) == \
        {"method": "laet", "head_hidden": "[128, 64]"}


def test_a_run_logs_every_log_line_and_its_first_choice_to_the_trackers(model_dir, tmp_path):  # noqa: F811
    from laet_fast.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    cfg = TrainConfig(method="grad_norm", k=2, reselect_every=2, max_steps=4, batch_size=4, eval_every=2,
                      out=str(tmp_path / "run"), progress=False)
    trainer = Trainer(model, tokenizer, cfg, labelled_texts(40, 0), labelled_texts(12, 1))
    recorder = Recorder()
    trainer.trackers.append(recorder)
    trainer.fit()
    assert recorder.config["method"] == "grad_norm" and recorder.config["reselect_every"] == 2
    steps = [step for step, _ in recorder.logs]
    assert steps == [0, 1, 2, 3, 4]
    first = recorder.logs[0][1]
    assert first["selection/count"] == 2 and "layer_scores/grad_norm/0" in first
    lines = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    for line, (_, logged) in zip(lines, recorder.logs[1:]):
        assert logged["loss"] == pytest.approx(line["loss"])
        if "eval" in line:
            assert logged["eval/accuracy"] == line["eval"]["accuracy"]
        if "layer_scores" in line:  # a re-selection's scores, block by block
            assert logged["layer_scores/grad_norm/1"] == pytest.approx(line["layer_scores"]["grad_norm"][1])


def test_a_tracker_whose_package_is_missing_is_a_one_line_error(model_dir, tmp_path):  # noqa: F811
    from accelerate.tracking import get_available_trackers

    from laet_fast.loading import load_model_and_tokenizer

    if "tensorboard" in {str(t) for t in get_available_trackers()}:
        pytest.skip("tensorboard is installed here")
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    cfg = TrainConfig(method="last", k=1, max_steps=1, out=str(tmp_path / "run"), progress=False,
                      report_to="tensorboard")
    with pytest.raises(ValueError, match="pip install tensorboard"):
        Trainer(model, tokenizer, cfg, labelled_texts(20, 0)).fit()
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")
    with pytest.raises(ValueError, match="report_to='nope'"):
        TrainConfig(report_to="nope")
