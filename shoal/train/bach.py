"""Paper 002, chapter 7, example 2: a character-level LSTM that writes music in ABC notation, after Bach.

    shoal train bach --export models/

The data: the 371 four-part chorales of the music21 corpus (MusicXML). Their soprano lines are
written as ABC text, the notation the book uses: a header (``X:`` number, ``T:`` title, ``M:`` metre,
``L:1/8`` unit length, ``K:`` key) and the notes bar by bar (``^`` sharp, ``_`` flat, ``=`` natural,
``c`` an octave above ``C``, ``'`` and ``,`` octaves further, a number or ``/2`` for the length,
``z`` a rest, ``-`` a tie). Accidentals follow ABC's rule: the key signature, then any accidental
earlier in the same bar. Converting the corpus takes about a minute; the text is cached.

The model reads characters and predicts the next one: an embedding, a two-layer LSTM and a linear
layer, trained on 90% of the chorales and tested on the rest (bits per character). Then it writes
new tunes, starting from ``X:``, one character at a time at a chosen temperature, into
``samples.abc``; each is read back with music21's ABC parser, and the share that parse is reported,
with the first one drawn as a piano roll (``sample.png``).

Served as a next-character model: input ``text`` INT64 [-1, length] (character indices; the labels
of the output are the characters), output ``next`` FP32 [-1, vocabulary] logits of the next one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.data.mnist import DatasetError, cache_dir
from shoal.modelrepo import TensorSpec
from shoal.train.catalogue import Run, Trained
from shoal.train.figures import pyplot, save
from shoal.train.loop import begin, plot_history
from shoal.train.publish import torch_publisher

ABC_FORMAT = 1  # bump when to_abc changes what it writes (the cache key)


@dataclass
class Config:
    data: str = "chorales"  # the Bach chorales of the music21 corpus (the only choice)
    chorales: int = 0  # use the first N chorales only (0: all 371)
    test_fraction: float = 0.1  # chorales held out for the test figure
    length: int = 100  # characters per training sequence
    embedding: int = 32  # size of each character's vector
    hidden: int = 128  # LSTM units per layer
    layers: int = 2  # stacked LSTM layers
    epochs: int = 40  # passes over the training text
    lr: float = 0.003  # Adam's step
    batch_size: int = 32  # sequences per step
    samples: int = 5  # tunes to write when done
    temperature: float = 0.8  # sampling temperature (lower: safer, more repetitive)
    seed: int = 0  # seed of the weights, the shuffling and the sampling


# ------------------------------------------------------------------------------------------- ABC text


def _key_name(sharps: int) -> str:
    from music21 import key

    return key.KeySignature(sharps).asKey("major").tonic.name.replace("-", "b")


def _length(quarters: Fraction) -> str:
    """A duration in units of an eighth note (L:1/8), as ABC writes it."""
    n = Fraction(quarters) * 2
    if n == 1:
        return ""
    if n.denominator == 1:
        return str(n.numerator)
    if n.numerator == 1:
        return "/" if n.denominator == 2 else f"/{n.denominator}"
    return f"{n.numerator}/{n.denominator}"


def _pitch(step: str, octave: int) -> str:
    if octave >= 5:
        return step.lower() + "'" * (octave - 5)
    return step + "," * (4 - octave)


def to_abc(score: Any, number: int, title: str) -> str | None:
    """The first part (the soprano) of a music21 score as an ABC tune; None if it has no notes."""
    part = score.parts[0]
    flat = part.flatten()
    sigs, metres = flat.getElementsByClass("KeySignature"), flat.getElementsByClass("TimeSignature")
    sharps = sigs[0].sharps if sigs else 0
    in_key = {p.step: int(p.accidental.alter) for p in (sigs[0].alteredPitches if sigs else [])}
    bars = []
    for measure in part.getElementsByClass("Measure"):
        seen: dict[tuple[str, int], int] = {}  # accidentals written earlier in this bar
        tokens = []
        for n in measure.notesAndRests:
            if n.duration.quarterLength == 0 or n.isChord:
                continue  # grace notes; the soprano has no chords
            length = _length(Fraction(n.duration.quarterLength).limit_denominator(16))
            if n.isRest:
                tokens.append("z" + length)
                continue
            p = n.pitch
            alter = int(p.accidental.alter) if p.accidental is not None else 0
            current = seen.get((p.step, p.octave), in_key.get(p.step, 0))
            mark = "" if alter == current else {2: "^^", 1: "^", 0: "=", -1: "_", -2: "__"}[alter]
            seen[(p.step, p.octave)] = alter
            tie = "-" if n.tie is not None and n.tie.type in ("start", "continue") else ""
            tokens.append(mark + _pitch(p.step, p.octave) + length + tie)
        if tokens:
            bars.append(" ".join(tokens))
    if not bars:
        return None
    metre = metres[0].ratioString if metres else "4/4"
    head = f"X:{number}\nT:{title}\nM:{metre}\nL:1/8\nK:{_key_name(sharps)}\n"
    return head + " | ".join(bars) + " |]\n"


def chorales_abc(limit: int = 0, log=print) -> tuple[str, list[str]]:  # noqa: ANN001
    """Every chorale of the music21 corpus as ABC (cached), and their corpus names."""
    try:
        import music21
        from music21 import corpus
    except ImportError:
        raise DatasetError(
            "the Bach chorales come from music21's corpus: pip install --no-deps music21==10.5.1 "
            "and its small dependencies (more-itertools webcolors chardet jsonpickle joblib requests)"
        ) from None
    names = list(corpus.chorales.Iterator(returnType="filename"))
    names = names[:limit] if limit else names
    key = hashlib.sha256(f"{music21.__version__} {ABC_FORMAT} {names}".encode()).hexdigest()[:16]
    cached = cache_dir() / "catalogue" / f"bach-abc-{key}.txt"
    if cached.is_file():
        return cached.read_text(), names
    from tqdm import tqdm

    tunes = []
    for i, name in enumerate(tqdm(names, desc="chorales to ABC", leave=False, disable=len(names) < 50)):
        abc = to_abc(corpus.parse(name), i + 1, name.split("/")[-1])
        if abc:
            tunes.append(abc)
    text = "\n".join(tunes)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(cached)
    log(f"wrote {len(tunes)} chorales as ABC to {cached}")
    return text, names


def parses(abc: str) -> int:
    """How many notes music21 reads from an ABC tune (0: it is not valid ABC to it)."""
    from music21 import converter

    try:
        s = converter.parse(abc, format="abc")
        return len(s.flatten().notes)
    except Exception:  # noqa: BLE001 (any parser error means: not a tune)
        return 0


# ------------------------------------------------------------------------------------------- model


class CharLSTM(nn.Module):
    def __init__(self, vocabulary: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, text: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        h, state = self.lstm(self.embed(text), state)
        return self.head(h), state


class EveryStep(nn.Module):
    """The training loop's view: logits at every position."""

    def __init__(self, model: CharLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model(text)[0]


class NextChar(nn.Module):
    """The served model: logits of the character after the text."""

    def __init__(self, model: CharLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.model(text)[0][:, -1]


class Sequences:
    """Example i: ``length`` characters from ``i * length / 2`` and the same shifted by one."""

    def __init__(self, ids: torch.Tensor, length: int) -> None:
        self.ids, self.length, self.stride = ids, length, max(1, length // 2)

    def __len__(self) -> int:
        return (len(self.ids) - self.length - 1) // self.stride + 1

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (idx * self.stride)[:, None] + torch.arange(self.length + 1)
        chunk = self.ids[rows]
        return chunk[:, :-1], chunk[:, 1:]


def sequence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@torch.no_grad()
def bits_per_char(model: CharLSTM, ids: torch.Tensor, length: int, device: torch.device) -> float:
    """Mean cross-entropy of each next character of ``ids``, in bits, reading it in pieces of
    ``length`` with the LSTM state carried from piece to piece."""
    model.eval()
    total, state = 0.0, None
    for i in range(0, len(ids) - 1, length):
        x = ids[i : i + length][None].to(device)
        y = ids[i + 1 : i + 1 + length][None].to(device)
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += float(F.cross_entropy(logits[0], y[0], reduction="sum"))
    return total / (len(ids) - 1) / math.log(2)


@torch.no_grad()
def sample(model: CharLSTM, chars: list[str], prime: str, temperature: float, limit: int, gen: torch.Generator) -> str:
    """Write one tune: ``prime`` then one character at a time until a blank line or ``limit``."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    logits, state = model(torch.tensor([[index[c] for c in prime]]))
    text = prime
    for _ in range(limit):
        p = torch.softmax(logits[0, -1] / temperature, 0)
        c = chars[int(torch.multinomial(p, 1, generator=gen))]
        if c == "\n" and text.endswith("\n"):
            break
        text += c
        logits, state = model(torch.tensor([[index[c]]]), state)
    return text.rstrip("\n") + "\n"


def plot_roll(abc: str, out: Path) -> Path | None:
    """A piano roll of a tune as music21 reads it."""
    from music21 import converter

    try:
        notes = [n for n in converter.parse(abc, format="abc").flatten().notes if n.isNote]
    except Exception:  # noqa: BLE001
        return None
    if not notes:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3))
    for n in notes:
        ax.barh(n.pitch.midi, float(n.quarterLength), left=float(n.offset), height=0.8, color="tab:blue")
    ax.set_xlabel("quarter notes")
    ax.set_ylabel("MIDI pitch")
    ax.set_title("a generated tune, as music21 reads its ABC")
    return save(fig, out)


def train(cfg: Config, run: Run, log=print) -> Trained:  # noqa: ANN001
    trainer = begin(run, "bach", cfg, "bach lstm")
    text, names = chorales_abc(cfg.chorales, log)
    tunes = text.split("\n\n")
    n_test = max(1, round(len(tunes) * cfg.test_fraction))
    train_text, test_text = "\n\n".join(tunes[:-n_test]) + "\n\n", "\n\n".join(tunes[-n_test:])
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    train_ids = torch.tensor([index[c] for c in train_text])
    test_ids = torch.tensor([index[c] for c in test_text])
    model = CharLSTM(len(chars), cfg.embedding, cfg.hidden, cfg.layers)
    log(
        f"{len(tunes)} chorales as ABC: {len(train_text):,} training and {len(test_text):,} test characters, "
        f"{len(chars)} distinct; {sum(p.numel() for p in model.parameters()):,} parameters"
    )

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_bits_per_char": bits_per_char(model, test_ids, cfg.length, trainer.ctx.device)}

    hist = trainer.fit(EveryStep(model), Sequences(train_ids, cfg.length), sequence_loss, evaluate, log)
    bpc = hist.epochs[-1]["test_bits_per_char"]
    gen = torch.Generator().manual_seed(cfg.seed)
    samples = cfg.samples if trainer.main else 0
    written = [sample(model, chars, "X:", cfg.temperature, 1500, gen) for _ in range(samples)]
    notes = [parses(t) for t in written]
    valid = sum(1 for n in notes if n > 0)
    samples_file = trainer.out / "samples.abc"
    if trainer.main:
        samples_file.write_text("\n".join(written))
        log(f"wrote {len(written)} tunes to {samples_file}; music21 reads {valid} of them as ABC")
    first = next((t for t, n in zip(written, notes, strict=True) if n > 0), None)
    trainer.draw(
        {
            "curves.png": lambda p: plot_history(hist, p, "character LSTM on Bach chorales in ABC"),
            "sample.png": lambda p: plot_roll(first, p) if first else None,
        }
    )
    dataset = f"{len(tunes)} Bach chorales (music21 corpus), soprano lines in ABC"
    details = {
        "samples": len(written),
        "samples_read_by_music21": valid,
        "notes_per_sample": notes,
        "vocabulary": len(chars),
        "samples_file": str(samples_file),
    }
    sha = {"abc_text": hashlib.sha256(text.encode()).hexdigest()}
    outcome = trainer.outcome("bach-lstm", dataset, "test bits per character", bpc, details, sha)
    feeds = {"text": test_ids[: 4 * 50].reshape(4, 50).numpy()}
    pub = torch_publisher(
        NextChar(model),
        "bach-lstm",
        feeds,
        [TensorSpec("next", "FP32", (-1, len(chars)))],
        {"next": chars},
        classify=True,
        dynamic={"text": {1: "length"}},
    )
    return Trained(outcome, pub)
