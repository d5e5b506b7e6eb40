"""DeepCT-style learned term weights (Dai & Callan, 2019; HDCT, 2020) on the 2-layer SPLADE-tiny BERT.

A linear head over the contextual output of every word piece regresses how important the word is
to its passage. Weights are read per *analysed term* (analysis.analyze: the same stems BM25 indexes):
the text is split into the analyser's words, the tokenizer's word mapping takes each word's largest
piece weight, and a term's weight in the passage is the sum over its occurrences, so it replaces
term frequency in BM25 (DeepCT's recipe). Passages longer than the window are read in overlapping
windows, so every word gets a weight.

Training target: query term recall, the share of a passage's relevant SciFact train queries that
contain the term; passages without train queries use their title as the query over the body (HDCT's
weak supervision). The shipped artifact holds only the fine-tuned transformer layers and the head
(about 1.6 MB); the embeddings stay those of the installed base model.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .analysis import analyze, words_and_terms
from .beir import load_beir, passage_text, relevant
from .encoders import loaded_once
from .errors import InvalidArgument

log = logging.getLogger(__name__)

ARTIFACTS = Path(__file__).parent / "artifacts"
TERM_WEIGHTS_ARTIFACT = ARTIFACTS / "term_weights"
WINDOW_TOKENS = 256
WINDOW_STRIDE = 32  # tokens shared by consecutive windows of a long passage


# The SPLADE-tiny backbone, shared with the supervised quality estimator ---------------------------
def base_model_path() -> str:
    import cognition

    return os.path.join(os.path.dirname(cognition.__file__), "model")


@loaded_once(maxsize=1)
def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path())


def load_backbone():
    """A fresh BertModel with the base weights (2 layers, 128-d); the MLM head is not loaded."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused MLM-head weights are reported otherwise
    try:
        return AutoModel.from_pretrained(base_model_path(), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an artifact stores: every weight except the frozen word-piece embeddings."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if "embeddings" not in k}


def freeze_embeddings(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if "embeddings" in name:
            parameter.requires_grad = False


def load_artifact(model: nn.Module, directory: Path, kind: str) -> dict:
    """Load an artifact written by save_artifact into `model`; returns its config."""
    weights, config = directory / "model.safetensors", directory / "config.json"
    if not weights.is_file() or not config.is_file():
        raise InvalidArgument(
            f"no {kind} artifact at {directory} (model.safetensors and config.json expected); "
            f"train one with `sieve train {kind.replace('_', '-')} --data DIR --out DIR`")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or any("embeddings" not in k for k in missing):
        raise InvalidArgument(f"{weights} does not fit the {kind} model: {unexpected or missing}")
    return json.loads(config.read_text())


def save_artifact(model: nn.Module, directory: Path, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


class BackboneWithHead(nn.Module):
    """SPLADE-tiny's BERT and one linear output: per token (term weights) or pooled (quality)."""

    def __init__(self):
        super().__init__()
        self.bert = load_backbone()
        self.head = nn.Linear(self.bert.config.hidden_size, 1)

    def hidden(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# Term weights: the model over analysed words ------------------------------------------------------
class TermWeighter(BackboneWithHead):
    def forward(self, input_ids, attention_mask):
        return self.head(self.hidden(input_ids, attention_mask)).squeeze(-1)


def _windows(word_lists: list[list[str]], max_tokens: int):
    """Tokenised windows over pre-split words; each window knows its passage and word per piece."""
    tokenizer = load_tokenizer()
    # An empty word list would give a window of special tokens only; a placeholder keeps shapes.
    encoded = tokenizer([w or ["[UNK]"] for w in word_lists], is_split_into_words=True, truncation=True,
                        max_length=max_tokens, stride=WINDOW_STRIDE, return_overflowing_tokens=True,
                        padding=True, return_tensors="pt")
    passages = encoded["overflow_to_sample_mapping"].tolist()
    word_ids = [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(passages))]
    return encoded["input_ids"], encoded["attention_mask"], passages, torch.tensor(word_ids)


def _word_scores(pieces: torch.Tensor, word_ids: torch.Tensor, passages: list[int], n_words: list[int]):
    """Per passage, each word's largest piece weight over all windows (-inf for unseen words)."""
    out = [torch.full((n,), float("-inf")) for n in n_words]
    for window, passage in enumerate(passages):
        ids = word_ids[window]
        keep = (ids >= 0) & (ids < n_words[passage])
        out[passage] = out[passage].scatter_reduce(0, ids[keep], pieces[window][keep], reduce="amax")
    return out


class TermWeightModel:
    """Inference: passages -> {term: weight}; loaded once per artifact path.

    A term's weight is the sum over its occurrences of (tf_floor + the model's weight), that is
    tf_floor * tf + learned weight. Pure DeepCT (tf_floor 0) drops every term the model scores
    near zero and lost to BM25 on held-out SciFact train queries; a small floor keeps them
    (the floor is chosen on those held-out queries, see choose_tf_floor)."""

    def __init__(self, directory: Path):
        torch.manual_seed(0)
        self.model = TermWeighter()
        self.config = load_artifact(self.model, directory, "term_weights")
        self.model.eval()
        self.lock = threading.Lock()  # one forward pass at a time is fastest on few cores

    def weights(self, texts: list[str], batch_size: int = 32) -> list[dict[str, float]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        out: list[dict[str, float]] = [{} for _ in texts]
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            for row, weights in zip(rows, self._batch([texts[r] for r in rows])):
                out[row] = weights
        return out

    def _batch(self, texts: list[str]) -> list[dict[str, float]]:
        split = [words_and_terms(t) for t in texts]
        word_lists = [words for words, _ in split]
        input_ids, mask, passages, word_ids = _windows(word_lists, self.config.get("max_tokens", WINDOW_TOKENS))
        with self.lock, torch.inference_mode():
            pieces = self.model(input_ids, mask)
        scores = _word_scores(pieces, word_ids, passages, [len(w) for w in word_lists])
        floor = self.config.get("tf_floor", 0.0)
        result = []
        for (_, terms), word_scores in zip(split, scores):
            weights: dict[str, float] = defaultdict(float)
            for term, score in zip(terms, word_scores.clamp(min=0).tolist()):
                if term is not None:
                    weights[term] += floor + score
            result.append(dict(weights))
        return result


@loaded_once(maxsize=4)
def _load_model(directory: str) -> TermWeightModel:
    return TermWeightModel(Path(directory))


def term_weight_model(setting: str) -> TermWeightModel:
    """The model a collection's `term_weights` setting names: "" is the shipped artifact."""
    directory = Path(setting).expanduser() if setting else TERM_WEIGHTS_ARTIFACT
    if not (directory / "model.safetensors").is_file():
        raise InvalidArgument(
            f"term_weights: no learned term-weight artifact at {directory} (model.safetensors and "
            f"config.json expected); leave it empty for the shipped one or train one with "
            f"`sieve train term-weights --data DIR --out DIR`")
    return _load_model(str(directory.resolve()))


# Training -----------------------------------------------------------------------------------------
def training_step(loss: torch.Tensor, optimizer, scheduler, losses: list[float], bar, epoch: int) -> None:
    """One optimiser step of the SPLADE-tiny heads, with the running loss on the progress bar."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-50:]):.4f}")


def training_examples(corpus: dict, queries: dict, qrels: dict, query_ids: list[str]):
    """(words, per-word target or NaN for words that are not indexed, supervised by queries?)."""
    judged_by: dict[str, list[str]] = defaultdict(list)
    for qid in query_ids:
        for doc_id in qrels.get(qid, ()):
            judged_by[doc_id].append(qid)
    query_terms = {qid: set(analyze(queries[qid])) for qid in query_ids}
    examples = []
    for doc_id, doc in corpus.items():
        if doc_id in judged_by:  # query term recall
            recall = Counter(t for qid in judged_by[doc_id] for t in query_terms[qid])
            words, terms = words_and_terms(passage_text(doc))
            targets = [recall[t] / len(judged_by[doc_id]) if t else float("nan") for t in terms]
            examples.append((words, targets, True))
        elif doc["title"] and doc["text"]:  # HDCT: the title is the query, the body the passage
            title = set(analyze(doc["title"]))
            words, terms = words_and_terms(doc["text"])
            examples.append((words, [float(t in title) if t else float("nan") for t in terms], False))
    return examples


def train_term_weights(data_dir: str | Path, out_dir: str | Path, epochs: int = 2, batch_size: int = 16,
                       lr: float = 3e-4, max_tokens: int = 256, validation_share: float = 0.15,
                       max_examples: int | None = None, threads: int = 1, seed: int = 0,
                       progress: bool = True) -> dict:
    """Train the term-weight head (and the two transformer layers) on a BEIR folder's train split.

    A share of the train queries is held out: their passages get no query supervision, and they
    score the finished model against BM25. Returns the config written beside the weights.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    started = time.time()
    corpus, queries, qrels = load_beir(data_dir, "train")
    qrels = relevant(qrels, corpus)
    query_ids = sorted(qrels, key=lambda q: (random.random(), q))
    held_out = query_ids[:int(len(query_ids) * validation_share)]
    train_ids = query_ids[len(held_out):]
    examples = training_examples(corpus, queries, qrels, train_ids)
    random.shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    model = TermWeighter()
    freeze_embeddings(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    bar = tqdm(total=steps, desc="term weights", disable=not progress, mininterval=10)
    for epoch in range(epochs):
        random.shuffle(examples)
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            input_ids, mask, passages, word_ids = _windows([e[0] for e in batch], max_tokens)
            pieces = model(input_ids, mask)
            # Each word is trained on its first piece of every window it appears in.
            first = torch.zeros_like(word_ids, dtype=torch.bool)
            first[:, 1:] = (word_ids[:, 1:] != word_ids[:, :-1]) & (word_ids[:, 1:] >= 0)
            first[:, 0] = word_ids[:, 0] >= 0
            targets = torch.full(word_ids.shape, float("nan"))
            for window, passage in enumerate(passages):
                target = torch.tensor(batch[passage][1] or [float("nan")], dtype=torch.float32)
                ids = word_ids[window].clamp(min=0, max=len(target) - 1)
                targets[window] = torch.where(first[window], target[ids], torch.tensor(float("nan")))
            use = ~torch.isnan(targets)
            if not use.any():
                continue
            training_step(nn.functional.mse_loss(pieces[use], targets[use]), optimizer, scheduler, losses, bar, epoch)
    bar.close()
    config = {
        "base_model": "SPLADE-tiny BERT (cognition/model, 2 layers, 128-d); embeddings frozen, not stored",
        "max_tokens": max_tokens, "epochs": epochs, "batch_size": batch_size, "lr": lr, "steps": len(losses),
        "training_passages": len(examples),
        "query_supervised_passages": sum(1 for e in examples if e[2]),
        "title_supervised_passages": sum(1 for e in examples if not e[2]),
        "train_queries": len(train_ids), "held_out_queries": len(held_out),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_seconds": round(time.time() - started, 1), "data": str(data_dir),
    }
    out_dir = Path(out_dir)
    save_artifact(model, out_dir, config)
    (out_dir / "held_out_queries.json").write_text(json.dumps(held_out))
    config.update(choose_tf_floor(out_dir, data_dir, progress=progress))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    log.info("term weights written to %s (%s)", out_dir, config)
    return config


TF_FLOORS = (0.0, 0.1, 0.25, 0.5)


def choose_tf_floor(artifact: str | Path, data_dir: str | Path, floors=TF_FLOORS, progress: bool = True) -> dict:
    """nDCG@10 on the held-out train queries for each tf_floor, against BM25; picks the best floor.

    Needs ir-measures (the bench extra). Scores the whole corpus once with the model."""
    import ir_measures
    from ir_measures import nDCG

    from .lexical import BM25Retriever, SparsePart, SparseRows
    from .settings import CollectionSettings

    artifact = Path(artifact)
    corpus, queries, qrels = load_beir(data_dir, "train")
    qrels = relevant(qrels, corpus)
    held_out = json.loads((artifact / "held_out_queries.json").read_text())
    ids = list(corpus)
    texts = [passage_text(corpus[d]) for d in ids]
    model = TermWeightModel(artifact)
    model.config["tf_floor"] = 0.0
    learned = []
    for start in tqdm_range(len(texts), 256, "scoring for tf_floor", progress):
        learned.extend(model.weights(texts[start:start + 256]))
    counts = [Counter(analyze(text)) for text in texts]
    lengths = [sum(c.values()) for c in counts]
    retriever = BM25Retriever(CollectionSettings(indexes=("bm25",)))
    judged = [ir_measures.Qrel(q, d, 1) for q in held_out for d in qrels[q]]

    def ndcg(rows: list[dict[str, float]]) -> float:
        matrix = SparseRows.from_counters(rows, lengths)
        part = SparsePart(matrix, matrix.matrix.tocsc(), {t: i for i, t in enumerate(matrix.terms.tolist())})
        run = [ir_measures.ScoredDoc(q, ids[hit.row], hit.score) for q in held_out
               for hit in retriever.search([part], [np.array([], "int64")], dict(Counter(analyze(queries[q]))), 100)]
        return round(float(ir_measures.calc_aggregate([nDCG @ 10], judged, run)[nDCG @ 10]), 4)

    scores = {str(f): ndcg([{t: f * c[t] + w for t, w in row.items()} for row, c in zip(learned, counts)])
              for f in floors}
    best = max(floors, key=lambda f: scores[str(f)])
    return {"tf_floor": best, "held_out_ndcg10": {"bm25": ndcg([dict(c) for c in counts]),
                                                  **{f"tf_floor={f}": v for f, v in scores.items()}}}


def tqdm_range(total: int, step: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(0, total, step), desc=desc, disable=not progress, mininterval=10)
