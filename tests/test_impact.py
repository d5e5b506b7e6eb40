"""The learned-impact index: a real Collection with BM25 and impacts on a SciFact slice."""
import json
from collections import defaultdict

import pytest

from sieve.index.analysis import analyze
from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument
from sieve.index.settings import CollectionSettings
from sieve.index.term_weights import term_weight_model

from conftest import DATASETS

SCIFACT = DATASETS / "scifact"


@pytest.fixture(scope="module")
def scifact_slice():
    """The relevant passages of 30 test queries, plus 170 others; and those queries."""
    with open(SCIFACT / "corpus.jsonl") as lines:
        docs = {d.id: d for d in (Document.from_json(json.loads(line)) for line in lines)}
    with open(SCIFACT / "queries.jsonl") as lines:
        queries = {str(q["_id"]): q["text"] for q in map(json.loads, lines)}
    relevant = defaultdict(set)
    for line in list(open(SCIFACT / "qrels" / "test.tsv"))[1:]:
        qid, doc_id, _ = line.split("\t")
        relevant[qid].add(doc_id)
    chosen = dict(list(relevant.items())[:30])
    ids = sorted(set().union(*chosen.values()))
    ids += [d for d in docs if d not in ids][:200 - len(ids)]
    return [docs[d] for d in ids], {q: queries[q] for q in chosen}, chosen


@pytest.fixture(scope="module")
def collection(tmp_path_factory, scifact_slice):
    docs, _, _ = scifact_slice
    collection = Collection.create(tmp_path_factory.mktemp("impact") / "c",
                                   CollectionSettings(indexes=("bm25", "impact")))
    collection.upsert(docs[:120])
    collection.upsert(docs[120:])
    yield collection
    collection.close()


def top_ids(collection, text, k=10, name="impact"):
    query = collection.encode_queries(name, [text])[0]
    return [hit.id for hit in collection.search({name: query}, k).hits]


def test_impact_search_finds_relevant_passages(collection, scifact_slice):
    _, queries, relevant = scifact_slice
    found = sum(bool(set(top_ids(collection, text)) & relevant[qid]) for qid, text in queries.items())
    assert found >= 0.7 * len(queries), found


def test_title_finds_its_passage(collection, scifact_slice):
    docs, _, _ = scifact_slice
    hits = [top_ids(collection, doc.title, 1)[0] == doc.id for doc in docs[:40]]
    assert sum(hits) >= 36


def test_deletes_and_compaction_keep_impacts_consistent(collection, scifact_slice):
    docs, _, _ = scifact_slice
    target, other = docs[5], docs[150]
    before = top_ids(collection, other.title, 5)
    collection.delete([target.id])
    assert target.id not in top_ids(collection, target.title, 50)
    postings_before = collection.stats()["details"]["impact"]["postings"]
    collection.compact()
    stats = collection.stats()
    assert stats["segments"] == 1 and stats["documents"] == len(docs) - 1
    assert stats["details"]["impact"]["postings"] < postings_before  # the deleted row's postings are gone
    assert top_ids(collection, other.title, 5) == before
    collection.upsert([target])
    assert top_ids(collection, target.title, 1) == [target.id]


def test_every_word_of_long_passages_gets_a_weight():
    model = term_weight_model("")
    long_text = "protein folding " * 2000 + "zebrafish"
    weights = model.weights(["", "x", "cancer", long_text, "Der Hund läuft schnell über die Wiese.", "中文" * 300])
    assert weights[0] == {} and weights[1] == {}
    assert set(weights[2]) == {"cancer"}
    assert analyze("zebrafish")[0] in weights[3]
    assert all(w >= 0 for row in weights for w in row.values())


def test_missing_artifact_is_rejected(tmp_path):
    with pytest.raises(InvalidArgument, match="term_weights"):
        Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25", "impact"),
                                                             term_weights=str(tmp_path / "nowhere")))
