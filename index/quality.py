"""Passage-quality static pruning (Chang, Mishra, Macdonald, MacAvaney, SIGIR 2024).

Each estimator scores a passage without any query, higher meaning more likely to be relevant to
some query; the lowest are kept out of the indexes (the collection still stores them, with their
scores, for ListPruned and Reinstate). Estimators, cheapest first:

- unique_terms: the ratio of distinct to all analysed terms, times the number of distinct terms,
  so that repetitive spam scores low and a one-word passage does not score a perfect ratio.
- lm_divergence: minus the KL divergence of the passage's term distribution from the batch's
  collection language model (add-one smoothed). No general-English model exists offline, and the
  batch is the collection's own language; junk, garbled or foreign text diverges most.
- embedding_norm: minus the norm of the mean contextual vector of the 2-layer SPLADE-tiny BERT.
  Measured here, junk (repetition, gibberish, empty) has the larger norms, so smaller is better;
  on SciFact the norm barely separates judged from unjudged passages (AUC 0.51).
- supervised: QualT5 in spirit: the same 2-layer BERT with a classifier head, trained on whether a
  passage was ever judged relevant to a SciFact train query; the score is log P(relevant).

Pruning is by threshold (scores below it) when `prune_threshold` is set, else by `prune_ratio`, the
lowest fraction of each batch. A percentile of a handful of passages is noise, so batches smaller
than MIN_BATCH_FOR_RATIO are not pruned by ratio (set a threshold for small batches).
"""
from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .analysis import analyze
from .beir import load_beir, passage_text, relevant
from .documents import Document
from .encoders import loaded_once
from .errors import InvalidArgument
from .settings import CollectionSettings
from .term_weights import (
    ARTIFACTS, BackboneWithHead, freeze_embeddings, load_artifact, load_tokenizer,
    save_artifact, training_step,
)

log = logging.getLogger(__name__)

QUALITY_ARTIFACT = ARTIFACTS / "quality"
MIN_BATCH_FOR_RATIO = 32
QUALITY_TOKENS = 128  # quality shows in a passage's opening; half the indexing window halves the cost


def split_by_quality(docs: list[Document], settings: CollectionSettings):
    """(kept, pruned, scores of kept + pruned in that order, float32)."""
    scores = score_passages([doc.content for doc in docs], settings.quality_estimator)
    prune = prune_mask(scores, settings.prune_ratio, settings.prune_threshold)
    kept = [doc for doc, p in zip(docs, prune) if not p]
    pruned = [doc for doc, p in zip(docs, prune) if p]
    if pruned:
        log.info("quality (%s): pruned %d of %d passages", settings.quality_estimator, len(pruned), len(docs))
    return kept, pruned, np.concatenate([scores[~prune], scores[prune]]).astype("float32")


def prune_mask(scores: np.ndarray, ratio: float, threshold: float | None) -> np.ndarray:
    """True for passages to prune: below the threshold, else the lowest `ratio` of the batch."""
    if threshold is not None:
        return scores < threshold
    prune = np.zeros(len(scores), bool)
    if len(scores) >= MIN_BATCH_FOR_RATIO:
        prune[np.argsort(scores, kind="stable")[:int(ratio * len(scores))]] = True
    return prune


def score_passages(texts: list[str], estimator: str) -> np.ndarray:
    estimators = {"unique_terms": unique_terms, "lm_divergence": lm_divergence,
                  "embedding_norm": embedding_norm, "supervised": supervised}
    if estimator not in estimators:
        raise InvalidArgument(f"unknown quality estimator {estimator!r}; choose from {', '.join(estimators)}")
    return np.asarray(estimators[estimator](texts), "float32")


# Unsupervised -------------------------------------------------------------------------------------
def unique_terms(texts: list[str]) -> np.ndarray:
    scores = []
    for text in texts:
        terms = analyze(text)
        distinct = len(set(terms))
        scores.append(distinct * distinct / len(terms) if terms else 0.0)
    return np.array(scores)


def lm_divergence(texts: list[str]) -> np.ndarray:
    counts = [Counter(analyze(text)) for text in texts]
    collection = Counter()
    for c in counts:
        collection.update(c)
    total = sum(collection.values()) + len(collection) + 1  # add-one, plus room for unseen terms
    worst = -math.log(total)  # the divergence of a passage made of one unseen term; for empty ones too
    scores = []
    for c in counts:
        length = sum(c.values())
        if not length:
            scores.append(worst)
            continue
        kl = sum(n / length * math.log((n / length) / ((collection[t] + 1) / total)) for t, n in c.items())
        scores.append(-kl)
    return np.array(scores)


# Neural (the 2-layer SPLADE-tiny BERT) ------------------------------------------------------------
class QualityModel(BackboneWithHead):
    def pooled(self, input_ids, attention_mask):
        hidden = self.hidden(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask):
        return self.head(self.pooled(input_ids, attention_mask)).squeeze(-1)


def _tokens(texts: list[str], max_tokens: int = QUALITY_TOKENS):
    encoded = load_tokenizer()(texts, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def _batched(texts: list[str], run, batch_size: int = 64) -> np.ndarray:
    """Run `run(input_ids, mask)` over length-sorted batches (little padding), in input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros(len(texts), "float32")
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = run(*_tokens([texts[r] for r in rows])).float().numpy()
    return out


@loaded_once(maxsize=1)
def _base_model() -> QualityModel:
    torch.manual_seed(0)
    return QualityModel().eval()


def embedding_norm(texts: list[str]) -> np.ndarray:
    model = _base_model()
    return _batched(texts, lambda ids, mask: -model.pooled(ids, mask).norm(dim=-1))


@loaded_once(maxsize=4)
def quality_model(directory: str = "") -> QualityModel:
    model = QualityModel()
    load_artifact(model, Path(directory) if directory else QUALITY_ARTIFACT, "quality")
    return model.eval()


def supervised(texts: list[str], directory: str = "") -> np.ndarray:
    model = quality_model(directory)
    return _batched(texts, lambda ids, mask: nn.functional.logsigmoid(model(ids, mask)))


# Training -----------------------------------------------------------------------------------------
def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    positives, negatives = scores[labels == 1], scores[labels == 0]
    return float(mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives)))


@functools.lru_cache(maxsize=1)
def _vocabulary() -> list[str]:
    return sorted(w for w in load_tokenizer().get_vocab() if w.isalpha() and len(w) > 2)


def synthetic_junk(text: str, rng: random.Random) -> str:
    """A junk passage made from a real one: repetition, a fragment, shuffled words or gibberish.

    The train labels only contrast real passages with each other; without these the classifier has
    never seen junk and scores it as it pleases (it scored repetition above real passages)."""
    words = text.split() or ["empty"]
    kind = rng.randrange(4)
    if kind == 0:  # a phrase of the passage, or of any English word pieces, over and over
        start = rng.randrange(len(words))
        phrase = words[start:start + rng.randint(1, 4)] if rng.random() < 0.5 else rng.sample(_vocabulary(), rng.randint(1, 4))
        return " ".join(phrase * rng.randint(5, 60))
    if kind == 1:
        return " ".join(words[:rng.randint(1, 3)])
    if kind == 2:
        return " ".join(rng.sample(words, len(words)))
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(1, 80)))


def train_quality(data_dir: str | Path, out_dir: str | Path, epochs: int = 2, batch_size: int = 32,
                  lr: float = 3e-4, validation_share: float = 0.15, junk_share: float = 0.2,
                  folds: int = 1, fold: int = 0,
                  max_examples: int | None = None, threads: int = 1, seed: int = 0,
                  progress: bool = True) -> dict:
    """Train the query-independent quality classifier on a BEIR folder's train qrels.

    Positives: passages judged relevant to any train query; negatives: every other passage, plus
    `junk_share` (of the passages) synthetic junk, fresh each epoch (synthetic_junk). A random
    share of passages is held out to measure AUC. With folds > 1, passages whose position falls in
    `fold` are left out entirely (for scoring a corpus with a model that never saw it).
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    started = time.time()
    corpus, _, qrels = load_beir(data_dir, "train")
    positives = set().union(*relevant(qrels, corpus).values())
    ids = [doc_id for i, doc_id in enumerate(sorted(corpus)) if folds == 1 or i % folds != fold]
    rng.shuffle(ids)
    validation, train = ids[:int(len(ids) * validation_share)], ids[int(len(ids) * validation_share):]
    if max_examples:
        train = train[:max_examples]
    passages = [(passage_text(corpus[d]), float(d in positives)) for d in train]
    n_positive = sum(label for _, label in passages)
    n_junk = int(junk_share * len(passages))
    model = QualityModel()
    freeze_embeddings(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * math.ceil((len(passages) + n_junk) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    pos_weight = torch.tensor((len(passages) - n_positive) / max(n_positive, 1))  # balance the classes
    losses = []
    bar = tqdm(total=steps, desc="quality", disable=not progress, mininterval=10)
    for epoch in range(epochs):
        examples = passages + [(synthetic_junk(text, rng), 0.0) for text, _ in rng.sample(passages, n_junk)]
        rng.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            logits = model(*_tokens([text for text, _ in batch]))
            labels = torch.tensor([label for _, label in batch])
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
            training_step(loss, optimizer, scheduler, losses, bar, epoch)
    bar.close()
    model.eval()
    labels = np.array([float(d in positives) for d in validation])
    scores = _batched([passage_text(corpus[d]) for d in validation], model)
    config = {
        "base_model": "SPLADE-tiny BERT (cognition/model, 2 layers, 128-d); embeddings frozen, not stored",
        "max_tokens": QUALITY_TOKENS, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "steps": len(losses), "training_passages": len(passages), "positives": int(n_positive),
        "synthetic_junk_per_epoch": n_junk,
        "validation_passages": len(validation),
        "validation_auc": _auc(labels, scores) if 0 < labels.sum() < len(labels) else None,
        "folds": folds, "fold": fold, "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_seconds": round(time.time() - started, 1), "data": str(data_dir),
    }
    save_artifact(model, Path(out_dir), config)
    log.info("quality model written to %s (%s)", out_dir, config)
    return config
