"""The on-disk collection: atomic commits, crash recovery, damaged files, consistency of its indexes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sieve.index.catalog import Catalog
from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import CorruptIndex, InvalidArgument
from sieve.index.settings import CollectionSettings

from conftest import corpus


@pytest.fixture(scope="module")
def adi():
    return corpus("adi")


def search_ids(collection, text, k=10, names=("dense", "bm25")):
    queries = {n: collection.encode_queries(n, [text])[0] for n in names}
    return [h.id for h in collection.search(queries, k).hits]


def test_crash_between_segment_and_manifest_keeps_last_commit(tmp_path, adi):
    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:30])
    # A real process writes the next segment, then dies before its manifest is written.
    script = textwrap.dedent(f"""
        import json, os
        from sieve.index.collection import Collection
        from sieve.index.documents import Document
        c = Collection.open(__import__("pathlib").Path({str(tmp_path / "c")!r}))
        docs = [Document.from_json(d) for d in json.loads({json.dumps([d.to_json() for d in adi[30:60]])!r})]
        c._new_segment(c.prepare(docs))
        os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert len(list((tmp_path / "c" / "segments").iterdir())) == 2  # the orphan is on disk
    reopened = Collection.open(tmp_path / "c")
    assert reopened.stats()["documents"] == 30 and reopened.snapshot.generation == 1
    assert len(list((tmp_path / "c" / "segments").iterdir())) == 1  # and was cleaned away
    reopened.upsert(adi[30:40])
    assert reopened.stats()["documents"] == 40


def test_damaged_newest_manifest_falls_back_to_previous_generation(tmp_path, adi):
    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:20])
    collection.upsert(adi[20:40])
    newest = sorted((tmp_path / "c").glob("manifest-*.json"))[-1]
    newest.write_text(newest.read_text()[:25])  # truncated
    reopened = Collection.open(tmp_path / "c")
    assert reopened.snapshot.generation == 1 and reopened.stats()["documents"] == 20
    assert reopened.health.state == "degraded"
    assert any(error.startswith(f"c/{newest.name}") for error in reopened.health.problems)
    assert len(list((tmp_path / "c" / "segments").iterdir())) == 2  # the newest segment is kept for repair


def test_truncated_segment_file_is_named(tmp_path, adi):
    catalog = Catalog(tmp_path)
    collection = catalog.create("c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:20])
    docs = next((tmp_path / "c" / "segments").iterdir()) / "docs.jsonl"
    docs.write_bytes(docs.read_bytes()[:100])
    for manifest in sorted((tmp_path / "c").glob("manifest-*.json"))[:-1]:
        manifest.unlink()  # no earlier generation to fall back to
    reopened = Catalog(tmp_path)  # the catalog still opens; the damaged collection is reported by name
    with pytest.raises(CorruptIndex, match="docs.jsonl"):
        reopened.get("c")


def test_every_index_stays_consistent_through_upserts_deletes_and_compaction(tmp_path, adi):
    collection = Collection.create(tmp_path / "c", CollectionSettings())
    for start in range(0, 80, 20):
        collection.upsert(adi[start:start + 20])
    collection.upsert([Document(adi[4].id, "a passage about volcanic eruptions and lava")])
    collection.delete([adi[9].id, adi[10].id])
    for names in (("dense",), ("bm25",), ("dense", "bm25")):
        found = search_ids(collection, "volcanic eruptions lava", k=80, names=names)
        assert found[0] == adi[4].id and found.count(adi[4].id) == 1
        assert {adi[9].id, adi[10].id}.isdisjoint(found)
    before = {q: search_ids(collection, q) for q in (adi[30].title, adi[60].title, "lava")}
    collection.compact()
    assert collection.stats()["segments"] == 1 and collection.stats()["deleted"] == 0
    assert {q: search_ids(collection, q) for q in before} == before
    assert collection.get(adi[4].id).text.startswith("a passage about volcanic")


def test_bm25_matches_bm25s_scores(tmp_path, adi):
    """Our scipy.sparse BM25 scores as bm25s does (Lucene idf, same k1 and b), across segments."""
    import bm25s

    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:41])
    collection.upsert(adi[41:])
    from sieve.index.analysis import analyze

    retriever = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    retriever.index([analyze(d.content) for d in adi], show_progress=False)
    query = "computer based indexing of technical documents"
    ours = collection.search({"bm25": collection.encode_queries("bm25", [query])[0]}, 10)
    rows, scores = retriever.retrieve([analyze(query)], k=10, show_progress=False)
    assert [h.id for h in ours.hits] == [adi[i].id for i in rows[0]]
    np.testing.assert_allclose([h.score for h in ours.hits], scores[0], rtol=1e-4)


def test_settings_validation():
    with pytest.raises(InvalidArgument, match="pool_factor"):
        CollectionSettings.from_dict({"pool_factor": 0})
    with pytest.raises(InvalidArgument, match="whole number"):
        CollectionSettings.from_dict({"pool_factor": 2.5})
    with pytest.raises(InvalidArgument, match="retriever 'dense' is not among"):
        CollectionSettings.from_dict({"indexes": ["bm25"], "retrievers": ["dense"]})
    assert CollectionSettings.from_dict({"pool_factor": 4.0}).pool_factor == 4
    settings = CollectionSettings.from_dict({"indexes": "bm25,dense"})
    assert CollectionSettings.from_dict(settings.to_dict()) == settings


def test_odd_passages_are_indexed(tmp_path):
    collection = Collection.create(tmp_path / "c", CollectionSettings())
    docs = [Document("one", "x"), Document("long", "word " * 5000), Document("de", "Über die Brücke gehen"),
            Document("zh", "信息检索系统"), Document("title-only", "", "Just a title")]
    assert collection.upsert(docs).upserted == 5
    assert search_ids(collection, "信息检索", names=("dense",))[0] == "zh"
    assert search_ids(collection, "Brücke", names=("bm25",))[0] == "de"


def test_a_batch_pruned_whole_is_stored_listed_and_reinstated(tmp_path, adi):
    settings = CollectionSettings(indexes=("bm25",), quality_estimator="unique_terms", prune_threshold=1e9)
    collection = Collection.create(tmp_path / "c", settings)
    collection.upsert(adi[:10], prune=False)
    result = collection.upsert(adi[10:20])
    assert (result.upserted, result.pruned) == (0, 10)
    assert {doc_id for doc_id, _ in collection.pruned()} == {d.id for d in adi[10:20]}
    assert adi[12].id not in search_ids(collection, adi[12].title, k=20, names=("bm25",))
    collection.reinstate([adi[12].id])
    assert search_ids(collection, adi[12].title, k=1, names=("bm25",)) == [adi[12].id]
    collection.compact()
    assert collection.stats()["pruned"] == 9 and collection.stats()["documents"] == 11


def test_unusable_settings_leave_no_collection_behind(tmp_path):
    catalog = Catalog(tmp_path)
    with pytest.raises(InvalidArgument, match="no-such-artifact"):
        catalog.create("c", CollectionSettings(indexes=("impact",), term_weights=str(tmp_path / "no-such-artifact")))
    assert not (tmp_path / "c").exists() and Catalog(tmp_path).names() == []
