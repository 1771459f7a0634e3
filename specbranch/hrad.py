"""H-RAD, the explicit (target-side) half of SpecBranch's hybrid rollback-aware drafting (DESIGN.md §2.3).

A small MLP reads the target's hidden states at the last verified position (the last ``num_layers``
layers, concatenated) and the target's input embedding of the token just fixed there, and predicts
how the next pending block will fare:

- class 0 *reject soon*: submit nothing more, branch right away;
- class 1 *partial*: use the draft-confidence cut τ;
- class 2 *accept all*: submit the whole block.

Labels come from decoding traces of the pair (:mod:`specbranch.train_hrad`): how many of the next
block's ``gamma - 1`` draft tokens the target accepts, bucketed by :func:`bucket`. The predictor
only decides how much is submitted and where the draft branches, never which token is accepted,
so it cannot change the output.

Files: ``<name>.safetensors`` (weights plus the feature standardisation, fp16) and ``<name>.json``
(its :class:`HRADConfig`, including the model pair it was trained for). Never pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError, ModelError

CLASSES = ("reject-soon", "partial", "accept-all")
SHIPPED = Path(__file__).parent / "data"  # predictors shipped with the package, one per model pair


@dataclass(frozen=True)
class HRADConfig:
    hidden_size: int  # the target's hidden size H
    num_layers: int = 4  # last N layers of the target whose hidden states are concatenated
    gamma: int = 4  # draft length the labels were bucketed for (blocks of gamma - 1 pending tokens)
    widths: tuple[int, ...] = (96, 64)  # (N+1)*H -> 96 -> 64 -> 3: about 1.5 MB in fp16 for H = 1536
    target: str = ""  # the model pair this predictor was trained on (registry name or folder name)
    draft: str = ""
    # Decision thresholds on the class probabilities, calibrated on held-out traces by `fit`
    # (see `calibrate`): reject-soon if P(reject) >= reject_threshold, else accept-all if
    # P(all) >= accept_threshold, else partial. Values above 1 switch a class off. The defaults
    # (0.5, 0.5) are a plain majority rule for predictors built before calibration existed.
    reject_threshold: float = 0.5
    accept_threshold: float = 0.5

    @property
    def in_features(self) -> int:
        return (self.num_layers + 1) * self.hidden_size  # N layers + the input embedding

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Indices for ``Decoder.forward(hidden_layers=...)``: the outputs of the last N layers."""
        return tuple(range(-self.num_layers, 0))


def bucket(accepted: int, gamma: int) -> int:
    """Label of a pending block of ``gamma - 1`` tokens of which ``accepted`` passed: none -> 0,
    all -> 2, some -> 1 (with gamma = 2 the block has one token and class 1 cannot occur)."""
    block = gamma - 1
    if not 0 <= accepted <= block:
        raise ValueError(f"accepted={accepted} outside 0..{block}")
    return 0 if accepted == 0 else 2 if accepted == block else 1


def features(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """``hidden [N, H]`` (last N layers at one position) + ``embedding [H]`` -> ``[(N+1) * H]``."""
    return torch.cat([hidden.reshape(-1), embedding.reshape(-1)]).float()


class HRADPredictor:
    """The MLP plus the standardisation of its inputs (hidden states have outlier dimensions
    orders of magnitude larger than the rest; without it training is dominated by them)."""

    def __init__(self, cfg: HRADConfig, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        dims = (cfg.in_features, *cfg.widths)
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], len(CLASSES)))
        self.mean = torch.zeros(cfg.in_features) if mean is None else mean.float()
        self.std = torch.ones(cfg.in_features) if std is None else std.float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., F]`` raw features -> class logits ``[..., 3]``."""
        return self.net((x.float() - self.mean) / self.std)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> int:
        return int(decide(torch.softmax(self.logits(x), -1), self.cfg.reject_threshold, self.cfg.accept_threshold))

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path.safetensors`` and ``path.json``."""
        weights, meta = _files(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().half().contiguous() for k, v in self.net.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous())
        save_file(tensors, str(weights))
        meta.write_text(json.dumps(asdict(self.cfg), indent=1) + "\n")
        return weights, meta

    @classmethod
    def load(cls, path: str | Path) -> "HRADPredictor":
        weights, meta = _files(path)
        if not weights.is_file() or not meta.is_file():
            raise ModelError(f"H-RAD predictor {path}: need both {weights.name} and {meta.name}")
        raw = json.loads(meta.read_text())
        cfg = HRADConfig(**{**raw, "widths": tuple(raw.get("widths", HRADConfig.widths))})
        tensors = load_file(str(weights))
        pred = cls(cfg, tensors.pop("mean"), tensors.pop("std"))
        pred.net.load_state_dict({k.removeprefix("net."): v.float() for k, v in tensors.items()})
        pred.net.eval()
        return pred

    def check_pair(self, target: str, draft: str, hidden_size: int) -> None:
        """Refuse a predictor trained on another model pair: its classes would be noise."""
        if (self.cfg.target, self.cfg.draft) != (target, draft) or self.cfg.hidden_size != hidden_size:
            raise ConfigError(
                f"the H-RAD predictor was trained for target {self.cfg.target!r} + draft {self.cfg.draft!r} "
                f"(hidden size {self.cfg.hidden_size}), not {target!r} + {draft!r}: train one for this pair with "
                "`specbranch train-hrad collect` and `fit`, or run without it (--hrad off)"
            )


def _files(path: str | Path) -> tuple[Path, Path]:
    """``x`` or ``x.safetensors`` or ``x.json`` -> (``x.safetensors``, ``x.json``). Names are handled
    as strings: model names like ``qwen2.5-coder`` contain dots that are not suffixes."""
    name = str(path)
    for ext in (".safetensors", ".json"):
        name = name.removesuffix(ext)
    return Path(name + ".safetensors"), Path(name + ".json")


def shipped_path(target: str, draft: str) -> Path:
    return SHIPPED / f"hrad-{target}--{draft}"


def find_shipped(target: str, draft: str) -> HRADPredictor | None:
    """The predictor shipped for this pair, if any (predictors are shipped for registry names only)."""
    if any(c in target + draft for c in "/\\"):
        return None
    path = shipped_path(target, draft)
    return HRADPredictor.load(path) if _files(path)[1].is_file() else None


# ---------------------------------------------------------------- training


@dataclass
class FitReport:
    accuracy: float
    balanced_accuracy: float
    precision: list[float]
    recall: list[float]
    confusion: list[list[int]]  # [true class][predicted class] on the held-out test split
    train_size: int
    val_size: int
    class_counts: list[int]  # over the whole trace set
    epochs: int
    reject_threshold: float = 0.5
    accept_threshold: float = 0.5
    history: list[dict] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"held-out accuracy {self.accuracy:.1%} (balanced {self.balanced_accuracy:.1%}) on {self.val_size} traces; "
            f"trained on {self.train_size} traces for {self.epochs} epochs; class counts "
            + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, self.class_counts)),
            f"decision: reject-soon if P >= {self.reject_threshold:.3f}, else accept-all if P >= "
            f"{self.accept_threshold:.3f}, else partial (thresholds > 1 never fire; calibrated on the validation split)",
            f"{'':>12s} " + " ".join(f"{c:>12s}" for c in CLASSES) + "   recall",
        ]
        for i, c in enumerate(CLASSES):
            row = " ".join(f"{n:12d}" for n in self.confusion[i])
            lines.append(f"{c:>12s} {row}   {self.recall[i]:.1%}")
        lines.append(f"{'precision':>12s} " + " ".join(f"{p:12.1%}" for p in self.precision))
        return "\n".join(lines)


def decide(probs: torch.Tensor, reject_threshold: float, accept_threshold: float) -> torch.Tensor:
    """Class probabilities ``[..., 3]`` -> decisions ``[...]`` (0 reject-soon, 1 partial, 2 accept-all)."""
    out = torch.where(probs[..., 2] >= accept_threshold, 2, 1)
    return torch.where(probs[..., 0] >= reject_threshold, 0, out)


def calibrate(probs: torch.Tensor, y: torch.Tensor, reject_cost: float = 3.0) -> tuple[float, float]:
    """Held-out probabilities ``[n, 3]`` and labels -> (reject_threshold, accept_threshold).

    Why: training is class-balanced, so the raw argmax over-predicts the rare reject-soon class
    (the first shipped predictor was right 14% of the times it said reject-soon). And the costs
    are lopsided: a false reject-soon throws away a block the target would have accepted (up to
    gamma - 1 tokens), a true one saves about one token (the branch hedges it). Each threshold
    maximises the net gain on the held-out rounds, ``right - cost * wrong`` over the rounds it
    fires on (cost ``reject_cost`` for reject-soon, 1 for accept-all against the confidence cut),
    so a class fires only where its marginal precision pays; 1.01 (never fires) if nothing pays."""

    def best(p: torch.Tensor, hit: torch.Tensor, cost: float) -> float:
        order = torch.argsort(p, descending=True)
        gain = torch.where(hit[order], 1.0, -cost).cumsum(0)  # net gain of firing on the top i+1
        if not len(gain) or float(gain.max()) <= 0:
            return 1.01
        return float(p[order][int(gain.argmax())])

    reject = best(probs[:, 0], y == 0, reject_cost)
    keep = probs[:, 0] < reject
    accept = best(probs[keep, 2], y[keep] == 2, 1.0)
    return reject, accept


def evaluate(pred: HRADPredictor, x: torch.Tensor, y: torch.Tensor) -> tuple[list[list[int]], float]:
    with torch.inference_mode():
        guess = decide(torch.softmax(pred.logits(x), -1), pred.cfg.reject_threshold, pred.cfg.accept_threshold)
    k = len(CLASSES)
    conf = torch.zeros(k, k, dtype=torch.long)
    conf.index_put_((y, guess), torch.ones_like(y), accumulate=True)
    acc = float((guess == y).float().mean()) if len(y) else 0.0
    return conf.tolist(), acc


def split(groups: torch.Tensor, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of three disjoint splits (test, val, train), test and val about ``fraction`` of
    the rows each, with every group (``groups [n]``, one id per row) whole inside one split. Why: the
    traces of one decode are neighbouring positions of one text, near-duplicates of each other; a
    split that scattered them would test the predictor on what it was trained on."""
    ids, inv = torch.unique(groups, return_inverse=True)
    order = torch.randperm(len(ids), generator=g)  # groups in a random order...
    sizes = torch.bincount(inv, minlength=len(ids))[order]
    before = sizes.cumsum(0) - sizes  # ...each preceded by this many rows
    n = max(1, int(len(groups) * fraction))
    part = torch.empty_like(order)
    part[order] = (before >= n).long() + (before >= 2 * n).long()  # per group: 0 test, 1 val, 2 train
    rows = torch.randperm(len(groups), generator=g)
    return tuple(rows[part[inv[rows]] == k] for k in range(3))


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: HRADConfig,
    groups: torch.Tensor | None = None,
    *,
    val_fraction: float = 0.2,
    epochs: int = 200,
    patience: int = 15,
    lr: float = 1e-4,  # 1e-3 overfits within the first epoch on real traces (7,680 inputs)
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> tuple[HRADPredictor, FitReport]:
    """Train on features ``x [n, F]`` and labels ``y [n]``: class-balanced cross-entropy, early stopping
    on a validation split's balanced loss (the best epoch's weights are kept), decision thresholds
    calibrated on that split (:func:`calibrate`), and the report measured on a third, test split.
    ``groups [n]`` (e.g. the prompt each trace came from) keeps every group inside one split."""
    from tqdm import tqdm

    if x.ndim != 2 or x.shape[1] != cfg.in_features or len(x) != len(y):
        raise ConfigError(f"traces have features {tuple(x.shape)} / labels {tuple(y.shape)}; "
                          f"expected [n, {cfg.in_features}] and [n]")
    if len(y) < 20:
        raise ConfigError(f"only {len(y)} traces: collect more prompts before training")
    if groups is not None and len(groups) != len(y):
        raise ConfigError(f"{len(groups)} group ids for {len(y)} traces")
    g = torch.Generator().manual_seed(seed)
    test, val, train = split(groups if groups is not None else torch.arange(len(y)), val_fraction, g)
    x, y = x.float(), y.long()
    counts = torch.bincount(y, minlength=len(CLASSES))
    weight = counts.sum() / (len(CLASSES) * counts.clamp_min(1)).float()  # class-balanced
    weight[counts == 0] = 0.0
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-3)
    pred = HRADPredictor(cfg, mean, std)
    opt = torch.optim.AdamW(pred.net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    best, best_state, stale, history = math.inf, None, 0, []
    bar = tqdm(range(epochs), desc="train H-RAD", disable=not progress)
    for epoch in bar:
        pred.net.train()
        perm = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(pred.logits(x[idx]), y[idx])
            loss.backward()
            opt.step()
        pred.net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(pred.logits(x[val]), y[val]))
        history.append({"epoch": epoch, "val_loss": val_loss})
        bar.set_postfix(val_loss=f"{val_loss:.3f}")
        if val_loss < best - 1e-4:
            best, stale = val_loss, 0
            best_state = {k: v.clone() for k, v in pred.net.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()
    pred.net.load_state_dict(best_state)
    pred.net.eval()
    with torch.inference_mode():
        reject, accept = calibrate(torch.softmax(pred.logits(x[val]), -1), y[val], reject_cost=max(1, cfg.gamma - 1))
    pred.cfg = replace(pred.cfg, reject_threshold=reject, accept_threshold=accept)
    conf, acc = evaluate(pred, x[test], y[test])
    k = len(CLASSES)
    recall = [conf[i][i] / max(1, sum(conf[i])) for i in range(k)]
    precision = [conf[i][i] / max(1, sum(conf[j][i] for j in range(k))) for i in range(k)]
    present = [i for i in range(k) if sum(conf[i])]
    balanced = sum(recall[i] for i in present) / max(1, len(present))
    report = FitReport(acc, balanced, precision, recall, conf, len(train), len(test), counts.tolist(), len(history),
                       reject, accept, history)
    return pred, report


# ---------------------------------------------------------------- traces on disk


def save_traces(folder: str | Path, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, meta: dict,
                shard: int = 0) -> Path:
    """One shard ``traces-NNNNN.safetensors`` (``features`` fp16 ``[n, F]``, ``labels`` int64 ``[n]``,
    ``groups`` int64 ``[n]``: the prompt each trace came from) and ``meta.json`` (the HRADConfig fields
    plus how the traces were made)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"traces-{shard:05d}.safetensors"
    save_file({"features": x.half().contiguous(), "labels": y.long().contiguous(),
               "groups": groups.long().contiguous()}, str(path))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_traces(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """-> features ``[n, F]``, labels ``[n]``, group ids ``[n]`` (distinct across shards), meta."""
    folder = Path(folder)
    shards = sorted(folder.glob("traces-*.safetensors"))
    if not shards or not (folder / "meta.json").is_file():
        raise ConfigError(f"{folder} holds no H-RAD traces (traces-*.safetensors + meta.json): "
                          "run `specbranch train-hrad collect` first")
    parts = [load_file(str(s)) for s in shards]
    x = torch.cat([p["features"] for p in parts]).float()
    y = torch.cat([p["labels"] for p in parts])
    return x, y, distinct_groups([p["groups"] for p in parts]), json.loads((folder / "meta.json").read_text())


def distinct_groups(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate group ids of several shards or folders, shifting each so none collide."""
    out, offset = [], 0
    for g in parts:
        out.append(g + offset)
        offset += int(g.max()) + 1 if len(g) else 0
    return torch.cat(out)
