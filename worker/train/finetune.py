"""Fine-tune a Hugging Face encoder as a sequence classifier on a 2-core CPU (GPU if present).

Batches are length-bucketed and padded per batch, because queries are short and padding to a
fixed length would spend most of the compute on pad tokens.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, PreTrainedModel, get_linear_schedule_with_warmup

from worker.errors import ModelError
from worker.train.data import Example

log = logging.getLogger(__name__)

#: Training truncation; routing queries are short, and long documents are chunked at inference.
TRAIN_MAX_TOKENS = 64
#: Batches per shuffled bucket: large enough that lengths within a batch are similar,
#: small enough that each epoch still sees a well-mixed order.
BUCKET_BATCHES = 50


@dataclass(frozen=True)
class FitConfig:
    epochs: float = 8.0
    batch_size: int = 32
    lr: float = 8e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    label_smoothing: float = 0.0
    #: Loss weight of the fallback (out-of-scope) labels: they are rare in training data
    #: (CLINC150: 100 of 15,100) but common in traffic, and missing one costs a wrong route.
    fallback_loss_weight: float = 1.0
    seed: int = 13


def load_tokenizer(base: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.no_padding()  # a saved tokenizer.json often pads to a fixed length: batch padding is ours
    tok.enable_truncation(max_length=TRAIN_MAX_TOKENS)
    return tok


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_batch(tok: Tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    encs = tok.encode_batch(list(texts))
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.zeros_like(torch.from_numpy(ids)),
    }


def _batches(examples: list[Example], lengths: list[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    span = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    yield from batches


def fit(
    base: Path,
    train: list[Example],
    labels: list[str],
    cfg: FitConfig,
    fallback_labels: frozenset[str] = frozenset(),
    device: str | None = None,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Return the fine-tuned model (eval mode, on CPU) and the tokenizer it was trained with."""
    seed_everything(cfg.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = load_tokenizer(base)
    label_ids = {label: i for i, label in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_ids,
        ignore_mismatched_sizes=True,
    ).to(dev)
    if cfg.epochs <= 0:
        return model.eval().cpu(), tok
    lengths = [len(e.ids) for e in tok.encode_batch([x.text for x in train])]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    no_decay = ("bias", "LayerNorm.weight")
    params = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(total * cfg.warmup_fraction), total)
    class_weight = torch.tensor(
        [cfg.fallback_loss_weight if lb in fallback_labels else 1.0 for lb in labels], device=dev
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=cfg.label_smoothing)
    rng = random.Random(cfg.seed)
    model.train()
    step = 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    epochs = math.ceil(total / steps_per_epoch)
    with Progress(*columns) as progress:
        for epoch in range(1, epochs + 1):
            # one bar per epoch (the last may be partial): a user sees the loss fall epoch by epoch
            steps = min(steps_per_epoch, total - step)
            task = progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss=float("nan"))
            for idx in itertools.islice(_batches(train, lengths, cfg.batch_size, rng), steps):
                batch = {k: v.to(dev) for k, v in encode_batch(tok, [train[i].text for i in idx]).items()}
                target = torch.tensor([label_ids[train[i].label] for i in idx], device=dev)
                loss = loss_fn(model(**batch).logits, target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                progress.update(task, advance=1, loss=loss.item())
    return model.eval().cpu(), tok


def average(checkpoints: Sequence[Path], labels: list[str]) -> tuple[PreTrainedModel, Tokenizer]:
    """A uniform "model soup" (Wortsman et al., ICML 2022): the mean of the weights of models
    fine-tuned from one base with different hyperparameters. It costs one model at inference and,
    on CLINC150, beat each of its ingredients on the validation split (README, model quality)."""
    if not checkpoints:
        raise ModelError("nothing to average: name at least one checkpoint")
    models = [AutoModelForSequenceClassification.from_pretrained(str(c)) for c in checkpoints]
    for path, m in zip(checkpoints, models, strict=True):
        names = [m.config.id2label[i] for i in range(m.config.num_labels)]
        if names != labels:
            raise ModelError(f"{path}: its labels are not the data's labels in the same order; cannot average")
    soup = models[0]
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for name, tensor in soup.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.stack([state[name] for state in states]).mean(dim=0))
    return soup.eval(), load_tokenizer(checkpoints[0])


@torch.inference_mode()
def predict_proba(model: PreTrainedModel, tok: Tokenizer, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Reference probabilities from the PyTorch model, to check the exported ONNX against."""
    out = []
    for start in range(0, len(texts), batch_size):
        logits = model(**encode_batch(tok, texts[start : start + batch_size])).logits
        out.append(torch.softmax(logits, dim=-1).numpy())
    return np.concatenate(out)
