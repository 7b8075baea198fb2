"""Histograms, images and text for every logger (guardrl/logger_media.py), and guardrl.analysis reading CSV
and W&B runs (guardrl/analysis/events.py).

Unit checks call the three functions with a real logger of each kind and read what landed on disk: the
histogram's summary scalars for a known tensor, the PNG's pixels, the text. One real tiny fit with
TensorBoard, CSV, W&B (offline) and MLflow (file store) loggers at once, and a logger of no known kind,
checks the callbacks' output in each and reads the CSV and W&B runs back with guardrl.analysis.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image

from guardrl import analysis, logger_media
from guardrl.analysis import events
from guardrl.callbacks.image_grid import captions, make_grid
from guardrl.cli import main
from guardrl.logger_media import histogram_summary, log_histogram, log_image, log_text
from guardrl.logs import flush_loggers
from tests.conftest import tiny_fit_args
from tests.test_progress_and_grids import GROUP_SIZE, ITERATIONS, PROMPTS_PER_BATCH, _Recorder

# np.quantile (linear) of 0, 1, ..., 100: the quantile q is 100 q.
ARANGE_SUMMARY = {
    "num": 101.0,
    "mean": 50.0,
    "std": math.sqrt((101**2 - 1) / 12),  # population std of 0..n-1: sqrt((n^2 - 1) / 12)
    "min": 0.0,
    "max": 100.0,
    "p05": 5.0,
    "p25": 25.0,
    "p50": 50.0,
    "p75": 75.0,
    "p95": 95.0,
}


class RecordingLogger(Logger):
    """A logger guardrl does not know: it keeps every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[dict, int | None]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append(({k: float(v) for k, v in metrics.items()}, step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _trainer(*loggers, rank_zero=True):
    return SimpleNamespace(is_global_zero=rank_zero, loggers=list(loggers))


def _image(seed=0, height=5, width=7):
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def _pixels(image: torch.Tensor) -> np.ndarray:
    """What a PNG of `image` must hold: HWC uint8, rounded."""
    return (image.double() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


@pytest.fixture
def mlflow_env(monkeypatch):
    pytest.importorskip("mlflow")
    # MLflow >= 3.x refuses the file store unless asked; it is the store that needs no server or database.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# ------------------------------------------------------------------------------------------ summaries
def test_histogram_summary_of_a_known_tensor():
    assert histogram_summary(torch.arange(101.0)) == pytest.approx(ARANGE_SUMMARY, rel=1e-15)
    assert histogram_summary(torch.arange(101.0).reshape(1, 101).flip(1)) == pytest.approx(ARANGE_SUMMARY)
    empty = histogram_summary(torch.zeros(0))
    assert empty["num"] == 0 and all(math.isnan(empty[name]) for name in ARANGE_SUMMARY if name != "num")
    # analysis reads the same names (it does not import logger_media, which imports lightning)
    assert events.SUMMARY_STATS == logger_media.SUMMARY_STATS
    assert logger_media.media_path("images/groups", 3, ".png") == os.path.join(
        "media", "images_groups", "step_3.png"
    )
    assert logger_media.media_path("../x y", 0, ".txt") == os.path.join("media", "_x_y", "step_0.txt")


# ------------------------------------------------------------------------------------------ each logger
def test_tensorboard_gets_exactly_what_summary_writer_writes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    image, values = _image(), torch.randn(50, dtype=torch.float64)
    trainer = _trainer(logger)
    log_histogram(trainer, "ratio/log_ratio_t1", values, 2)
    log_image(trainer, "images/groups", image, 2, caption="not for TensorBoard")
    log_text(trainer, "config", "| a | b |", 2)
    logger.experiment.flush()
    reference = SummaryWriter(str(tmp_path / "reference"))  # what the callbacks wrote before logger_media
    reference.add_histogram("ratio/log_ratio_t1", values, 2)
    reference.add_image("images/groups", image, 2)
    reference.add_text("config", "| a | b |", 2)
    reference.flush()
    got, want = (
        EventAccumulator(path, size_guidance={"images": 0, "tensors": 0, "histograms": 0})
        for path in (logger.log_dir, str(tmp_path / "reference"))
    )
    got.Reload(), want.Reload()
    (hist,), (hist_want,) = got.Histograms("ratio/log_ratio_t1"), want.Histograms("ratio/log_ratio_t1")
    assert hist.step == 2 and hist.histogram_value == hist_want.histogram_value
    assert hist.histogram_value.num == 50 and hist.histogram_value.max == values.max().item()
    (png,), (png_want,) = got.Images("images/groups"), want.Images("images/groups")
    assert png.encoded_image_string == png_want.encoded_image_string and (png.height, png.width) == (5, 7)
    (text,) = got.Tensors("config/text_summary")
    assert text.step == 2 and text.tensor_proto.string_val[0].decode() == "| a | b |"
    assert not os.path.exists(os.path.join(logger.log_dir, "media"))  # no caption file, no extra tags
    assert got.Tags()["scalars"] == []


def test_csv_gets_summary_scalars_png_and_text_files(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = _trainer(logger)
    image = _image(1)
    log_histogram(trainer, "ratio/log_ratio_t2", torch.arange(101.0), 3)
    log_image(trainer, "images/groups", image, 3, caption="row 0: a red circle")
    log_text(trainer, "images/groups_captions", "| row | prompt |\n|---|---|", 3)
    csv_file = os.path.join(logger.log_dir, "metrics.csv")
    assert not os.path.exists(csv_file)  # CSVLogger keeps rows in memory until saved ...
    flush_loggers(SimpleNamespace(is_global_zero=True, loggers=[logger]))  # ... flush_loggers saves them
    table = pd.read_csv(csv_file)
    assert table["step"].tolist() == [3]
    assert {name: table[f"ratio/log_ratio_t2/{name}"][0] for name in ARANGE_SUMMARY} == pytest.approx(
        ARANGE_SUMMARY, rel=1e-15
    )
    media = os.path.join(logger.log_dir, "media")
    np.testing.assert_array_equal(_png(os.path.join(media, "images_groups", "step_3.png")), _pixels(image))
    with open(os.path.join(media, "images_groups", "step_3.caption.txt")) as file:
        assert file.read() == "row 0: a red circle"
    with open(os.path.join(media, "images_groups_captions", "step_3.txt")) as file:
        assert file.read() == "| row | prompt |\n|---|---|"

    # guardrl.analysis reads the CSV run: the summary scalars, and the histogram rebuilt from them
    scalars = analysis.load_scalars(tmp_path / "csv")  # the parent: its newest version_N
    assert dict(zip(scalars["tag"], scalars["value"])) == {
        f"ratio/log_ratio_t2/{name}": value for name, value in ARANGE_SUMMARY.items()
    }
    assert set(scalars["step"]) == {3} and scalars["wall_time"].isna().all()
    (row,) = analysis.load_ratio_histograms(tmp_path / "csv").to_dict("records")
    assert (row["kind"], row["k"], row["step"]) == ("log_ratio", 2, 3)
    assert (row["num"], row["mean"], row["min"], row["max"], row["sum"]) == (101, 50, 0, 100, 5050)
    assert row["std"] == pytest.approx(ARANGE_SUMMARY["std"], rel=1e-15)
    np.testing.assert_array_equal(row["bucket_limits"], [5, 25, 50, 75, 95, 100])
    np.testing.assert_allclose(row["bucket_counts"], 101 * np.array([0.05, 0.2, 0.25, 0.25, 0.2, 0.05]))
    assert analysis.trained_steps(tmp_path / "csv") == [2]


def test_mlflow_gets_summary_scalars_and_artifacts(tmp_path, mlflow_env):
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="guardrl", tracking_uri=f"file:{tmp_path}/mlruns")
    trainer = _trainer(logger)
    image = _image(2)
    log_histogram(trainer, "ratio/raw_log_ratio_t0", torch.arange(101.0), 4)
    log_image(trainer, "images/groups", image, 4, caption="the caption")
    log_text(trainer, "config", "### Model\n| a | `1` |", 0)
    client, run_id = logger.experiment, logger.run_id
    for name, value in ARANGE_SUMMARY.items():
        (metric,) = client.get_metric_history(run_id, f"ratio/raw_log_ratio_t0/{name}")
        assert (metric.step, metric.value) == (4, pytest.approx(value, rel=1e-15)), name
    artifacts = client.get_run(run_id).info.artifact_uri.removeprefix("file://")
    np.testing.assert_array_equal(_png(f"{artifacts}/media/images_groups/step_4.png"), _pixels(image))
    with open(f"{artifacts}/media/images_groups/step_4.caption.txt") as file:
        assert file.read() == "the caption"
    with open(f"{artifacts}/media/config/step_0.txt") as file:
        assert file.read() == "### Model\n| a | `1` |"


def test_wandb_offline_gets_histogram_image_text_and_analysis_reads_it(wandb_env):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(wandb_env), offline=True, project="guardrl")
    trainer = _trainer(logger)
    image = _image(3)
    logged = {0: {"reward/mean": 0.125, "train/loss": float("nan")}, 1: {"reward/mean": -2.5e-7}}
    for step, metrics in logged.items():
        logger.log_metrics(metrics, step=step)
    log_histogram(trainer, "ratio/log_ratio_t3", torch.arange(101.0), 1)
    log_image(trainer, "images/groups", image, 1, caption="the caption")
    log_text(trainer, "config", "| a | `1` |", 0)
    run_dir = logger.experiment.dir  # .../wandb/offline-run-<date>_<time>-<id>/files
    logger.experiment.finish()

    (png,) = glob.glob(os.path.join(run_dir, "media", "images", "images", "groups_*.png"))
    np.testing.assert_array_equal(_png(png), _pixels(image))
    (table,) = glob.glob(os.path.join(run_dir, "media", "table", "config_*.table.json"))
    with open(table) as file:
        assert json.load(file)["data"] == [["| a | `1` |"]]

    # guardrl.analysis: from the folder given to WandbLogger (its wandb/offline-run-* is found)
    assert analysis.resolve_run_dir(wandb_env) == analysis.resolve_run_dir(os.path.dirname(run_dir))
    scalars = analysis.load_scalars(wandb_env)
    plain = scalars[~scalars["tag"].str.startswith("ratio/")]
    assert plain[["tag", "step"]].values.tolist() == [
        ["reward/mean", 0],
        ["reward/mean", 1],
        ["train/loss", 0],
    ]
    assert plain["value"].tolist()[:2] == [0.125, -2.5e-7] and math.isnan(plain["value"].tolist()[2])
    assert (plain["wall_time"] > 1.7e9).all()
    summary = scalars[scalars["tag"].str.startswith("ratio/log_ratio_t3/")]
    assert dict(zip(summary["tag"].str.rpartition("/")[2], summary["value"])) == pytest.approx(ARANGE_SUMMARY)
    (row,) = analysis.load_ratio_histograms(wandb_env).to_dict("records")
    assert (row["kind"], row["k"], row["step"], row["num"], row["mean"]) == ("log_ratio", 3, 1, 101, 50)
    # the buckets are wandb.Histogram's own (64 bins over min..max), not the quantile buckets
    assert len(row["bucket_limits"]) == 64 and row["bucket_limits"][-1] == 100
    assert row["bucket_counts"].sum() == 101


def test_unknown_logger_gets_summary_scalars_and_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(logger_media, "_warned", set())
    logger = RecordingLogger()
    trainer = _trainer(logger)
    with caplog.at_level(logging.WARNING, logger="guardrl.logger_media"):
        log_histogram(trainer, "ratio/log_ratio_t0", torch.arange(101.0), 5)
        for step in (5, 6):
            log_image(trainer, "images/groups", _image(), step)
            log_text(trainer, "config", "text", step)
    assert logger.calls == [({f"ratio/log_ratio_t0/{k}": v for k, v in ARANGE_SUMMARY.items()}, 5)]
    (record,) = caplog.records  # one warning for the class, not one per call
    assert f"{RecordingLogger.__module__}.RecordingLogger" in record.getMessage()
    assert "not images or text" in record.getMessage()


def test_nothing_is_written_off_rank_zero(tmp_path):
    logger, recorder = CSVLogger(str(tmp_path), name="csv", version=0), RecordingLogger()
    trainer = _trainer(logger, recorder, rank_zero=False)
    log_histogram(trainer, "h", torch.arange(3.0), 0)
    log_image(trainer, "i", _image(), 0)
    log_text(trainer, "t", "x", 0)
    assert recorder.calls == [] and not os.path.exists(tmp_path / "csv")


def test_bad_image_names_its_shape(tmp_path):
    trainer = _trainer(CSVLogger(str(tmp_path), name="csv", version=0))
    with pytest.raises(
        ValueError,
        match=r"log_image\(tag='images/x'\): image must be \(3, H, W\) float in \[0, 1\], "
        r"got shape \(1, 4, 4\)",
    ):
        log_image(trainer, "images/x", torch.zeros(1, 4, 4), 0)


# ------------------------------------------------------------------------------------------ the reader
def test_csv_reader_keeps_logged_nans_and_the_last_row_of_a_step(tmp_path):
    run = tmp_path / "csv" / "version_1"
    run.mkdir(parents=True)
    (tmp_path / "csv" / "version_0").mkdir()  # older and empty: version_1 is read
    (run / "metrics.csv").write_text("a,b,step\n1.5,,0\nnan,7,1\n2.5,,0\n,not a number,2\n")
    frame = analysis.load_scalars(tmp_path / "csv")
    assert frame["tag"].tolist() == ["a", "a", "b"] and frame["step"].tolist() == [0, 1, 1]
    assert frame["value"].tolist()[0] == 2.5 and math.isnan(frame["value"].tolist()[1])
    assert frame["value"].tolist()[2] == 7
    assert analysis.scalar_table(run, ["a", "b"]).columns.tolist() == ["step", "a", "b"]


def test_reader_errors_name_the_formats(tmp_path):
    pytest.importorskip("wandb")
    with pytest.raises(FileNotFoundError, match=r"no CSVLogger metrics.csv and no W&B run file .*reads "):
        analysis.resolve_run_dir(tmp_path)
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"metrics.csv: no `step` column \(columns: \['a', 'b'\]\), so not "):
        analysis.load_scalars(tmp_path)
    wandb_run = tmp_path / "w" / "wandb" / "offline-run-20250101_000000-abc"
    wandb_run.mkdir(parents=True)
    (wandb_run / "run-abc.wandb").write_bytes(b"not wandb")
    with pytest.raises(ValueError, match="run-abc.wandb: not a W&B transaction log"):
        analysis.load_scalars(tmp_path / "w")
    header = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    (wandb_run / "run-abc.wandb").write_bytes(header + struct.pack("<IHB", 123, 3, 1) + b"abc")
    with pytest.raises(ValueError, match="damaged W&B record at byte 7"):
        analysis.load_scalars(tmp_path / "w")
    # A record cut short at the end (a live or killed run) only ends the scan.
    (wandb_run / "run-abc.wandb").write_bytes(header + struct.pack("<IHB", 123, 30, 1) + b"abc")
    assert analysis.load_scalars(tmp_path / "w").empty


# ------------------------------------------------------------------------------------------ a real fit
@pytest.fixture(scope="module")
def four_loggers(tmp_path_factory):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("loggers")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\ntwo yellow circles\n")
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root)}},
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root), "name": "csv"},
        },
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"save_dir": str(root), "offline": True, "project": "guardrl"},
        },
        {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"experiment_name": "guardrl", "tracking_uri": f"file:{root}/mlruns"},
        },
    ]
    args = tiny_fit_args(
        str(prompts),
        str(root),
        **{
            "--trainer.logger": json.dumps(loggers),
            "--trainer.enable_checkpointing": "false",
            "--image_grid.every_n_iterations": "2",
            "--model.max_iterations": str(ITERATIONS),
            "--data.group_size": str(GROUP_SIZE),
            "--data.prompts_per_batch": str(PROMPTS_PER_BATCH),
        },
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"}.items():
            patch.setenv(name, value)
        patch.setenv("WANDB_CONSOLE", "off")
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        cli = main(args, run=False)
        recorder, unknown = _Recorder(), RecordingLogger()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.loggers = [*cli.trainer.loggers, unknown]
        patch.setattr(logger_media, "_warned", set())
        warnings: list[str] = []
        patch.setattr(logger_media.log, "warning", lambda *a: warnings.append(a[0] % a[1:]))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tb, csv, wandb_logger, mlflow_logger, _ = cli.trainer.loggers
        wandb_dir = wandb_logger.experiment.dir
        wandb_logger.experiment.finish()
    return SimpleNamespace(
        root=root,
        tb=tb.log_dir,
        csv=csv.log_dir,
        wandb=os.path.dirname(wandb_dir),
        mlflow=mlflow_logger,
        recorder=recorder,
        unknown=unknown,
        warnings=warnings,
    )


def _logged_scalars(unknown: RecordingLogger) -> pd.DataFrame:
    """What write_scalars and log_histogram gave every logger, latest per (tag, step)."""
    rows = {(tag, step): value for metrics, step in unknown.calls for tag, value in metrics.items()}
    frame = pd.DataFrame(
        [(tag, step, value) for (tag, step), value in rows.items()], columns=["tag", "step", "value"]
    )
    return frame.sort_values(["tag", "step"]).reset_index(drop=True)


def _same_values(got: pd.Series, want: pd.Series) -> bool:
    return bool(((got == want) | (got.isna() & want.isna())).all())


@pytest.mark.slow
def test_fit_csv_and_wandb_runs_read_back_what_was_logged(four_loggers):
    want = _logged_scalars(four_loggers.unknown)
    assert (
        len(want) > 100 and "reward/mean" in set(want["tag"]) and "ratio/log_ratio_t0/p50" in set(want["tag"])
    )
    for run in (four_loggers.csv, four_loggers.wandb):
        got = analysis.load_scalars(run)[["tag", "step", "value"]]
        got = got[got["tag"] != "epoch"].reset_index(drop=True)  # lightning's own, not through write_scalars
        assert got[["tag", "step"]].equals(want[["tag", "step"]]), run
        assert _same_values(got["value"], want["value"]), run  # bit for bit: CSV and W&B keep float64
    # The histograms rebuilt from the summary scalars agree with TensorBoard's exact ones.
    tb = analysis.load_ratio_histograms(four_loggers.tb).set_index(["kind", "k", "step"])
    for run in (four_loggers.csv, four_loggers.wandb):
        other = analysis.load_ratio_histograms(run).set_index(["kind", "k", "step"])
        assert other.index.equals(tb.index) and len(tb) == 2 * 3 * ITERATIONS
        assert (other["num"] == tb["num"]).all()
        assert (other["min"] == tb["min"]).all() and (other["max"] == tb["max"]).all()
        np.testing.assert_allclose(other["mean"], tb["mean"], rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(other["std"], tb["std"], rtol=1e-4, atol=1e-12)
    summary_tb, summary_csv = analysis.run_summary(four_loggers.tb), analysis.run_summary(four_loggers.csv)
    pd.testing.assert_frame_equal(summary_tb, summary_csv, rtol=1e-4)


@pytest.mark.slow
def test_fit_images_and_text_in_csv_wandb_and_mlflow(four_loggers):
    outputs = four_loggers.recorder.outputs
    grids = {
        step: _pixels(make_grid(outputs[step][0], outputs[step][1], GROUP_SIZE, max_groups=4))
        for step in (0, 2, 3)
    }
    texts = {step: captions(outputs[step][2], outputs[step][1], GROUP_SIZE, 4) for step in (0, 2, 3)}
    csv_media = os.path.join(four_loggers.csv, "media")
    assert sorted(os.listdir(os.path.join(csv_media, "images_groups"))) == [
        f"step_{s}.png" for s in (0, 2, 3)
    ]
    mlflow = four_loggers.mlflow
    artifacts = mlflow.experiment.get_run(mlflow.run_id).info.artifact_uri.removeprefix("file://")
    for step, grid in grids.items():
        np.testing.assert_array_equal(
            _png(os.path.join(csv_media, "images_groups", f"step_{step}.png")), grid
        )
        np.testing.assert_array_equal(_png(f"{artifacts}/media/images_groups/step_{step}.png"), grid)
        for folder in (csv_media, f"{artifacts}/media"):
            with open(os.path.join(folder, "images_groups_captions", f"step_{step}.txt")) as file:
                assert file.read() == texts[step]
    wandb_pngs = glob.glob(
        os.path.join(four_loggers.wandb, "files", "media", "images", "images", "groups_*.png")
    )
    assert sorted(_png(p).tobytes() for p in wandb_pngs) == sorted(g.tobytes() for g in grids.values())
    with open(os.path.join(csv_media, "config", "step_0.txt")) as file:
        config = file.read()
    assert "### Model (hyperparameters)" in config and "| grpo.ratio_variant | `'grpo_guard'` |" in config
    with open(f"{artifacts}/media/config/step_0.txt") as file:
        assert file.read() == config
    (table,) = glob.glob(os.path.join(four_loggers.wandb, "files", "media", "table", "config_*.table.json"))
    with open(table) as file:
        assert json.load(file)["data"] == [[config]]
    # MLflow's histogram summaries, and the logger of no known kind: scalars and one warning
    p50 = four_loggers.mlflow.experiment.get_metric_history(mlflow.run_id, "ratio/log_ratio_t0/p50")
    want = _logged_scalars(four_loggers.unknown).set_index(["tag", "step"])["value"]
    assert [(m.step, m.value) for m in p50] == [
        (s, want[("ratio/log_ratio_t0/p50", s)]) for s in range(ITERATIONS)
    ]
    assert len(four_loggers.warnings) == 1 and "RecordingLogger" in four_loggers.warnings[0]
