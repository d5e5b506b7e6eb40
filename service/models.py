"""Which models a collection may name, and proof that they load: a server policy, applied at creation.

A collection's settings come from clients, so a model reference is an operator decision: local folders
are read only under SIEVE_MODEL_ROOTS, Hugging Face hub names only with SIEVE_ALLOW_HUB_MODELS, and a
model that cannot be loaded is refused when the collection is created, not at its first write.
"""
from __future__ import annotations

import re
from pathlib import Path

from sieve.index.encoders import DEFAULT_ENCODER_ALIASES, load_encoder
from sieve.index.errors import InvalidArgument
from sieve.index.settings import CollectionSettings

from .config import ServerConfig

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "organisation/name"


def check_reference(setting: str, value: str, config: ServerConfig) -> None:
    if value in DEFAULT_ENCODER_ALIASES:
        return
    path = Path(value).expanduser()
    if value.startswith(("/", ".", "~")) or path.exists() or not HUB_NAME.fullmatch(value):
        roots = [Path(root).expanduser().resolve() for root in config.model_roots.split(":") if root]
        if not any(path.resolve().is_relative_to(root) for root in roots):
            raise InvalidArgument(f"{setting} {value!r}: this server reads local models only under its model "
                                  f"roots (SIEVE_MODEL_ROOTS{'' if roots else ', not set'})")
        if not path.resolve().exists():
            raise InvalidArgument(f"{setting} {value!r}: no such model folder under the server's model roots")
    elif not config.allow_hub_models:
        raise InvalidArgument(f"{setting} {value!r}: this server loads no Hugging Face hub models "
                              "(SIEVE_ALLOW_HUB_MODELS is off); name a folder under its model roots")


def check_models(settings: CollectionSettings, config: ServerConfig) -> None:
    """Refuse a collection whose models are not allowed or do not load (runs off the event loop)."""
    for setting in ("encoder", "reranker", "term_weights"):
        check_reference(setting, getattr(settings, setting), config)
    try:
        if {"dense", "multivector"} & set(settings.indexes):
            load_encoder(settings.encoder, settings.max_tokens)
        if settings.reranker not in DEFAULT_ENCODER_ALIASES:
            from sieve.rankers import load_reranker

            load_reranker(settings.reranker)
    except Exception as error:  # whatever the loader raises, the client gets the cause
        raise InvalidArgument(f"the collection's models cannot be loaded: {type(error).__name__}: "
                              f"{str(error).splitlines()[0][:300]}") from None
