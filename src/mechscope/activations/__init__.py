"""Activations: text corpora, a streaming activation store, and on-disk shards.

From a notebook::

    from mechscope.activations import get_corpus, StoreConfig, ActivationStore
    store = ActivationStore(model, get_corpus(split="train"), StoreConfig(hooks=["blocks.6.hook_resid_post"]))
    batch = store.next_batch(4096)            # {"blocks.6.hook_resid_post": [4096, 576]}
    harvest(model, get_corpus(), cfg, "acts", n_tokens=1_000_000)   # shards on disk, resumable
    batch = ShardStore("acts").next_batch(4096)                      # the same API, from disk

``StoreConfig`` (``activations.config``, no torch) is imported with the package; the other
names load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.activations.config import StoreConfig

__all__ = [
    "ActivationStore", "Corpus", "Harvester", "ShardStore", "StoreConfig", "describe_corpus", "get_corpus", "harvest",
    "pack_contexts", "separator_id", "special_token_ids",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.activations.corpus import Corpus, describe_corpus, get_corpus
    from mechscope.activations.shards import ShardStore, harvest
    from mechscope.activations.store import ActivationStore, Harvester, pack_contexts, separator_id, special_token_ids

lazy_exports(__name__, {
    "Corpus": "corpus", "describe_corpus": "corpus", "get_corpus": "corpus",
    "ShardStore": "shards", "harvest": "shards",
    "ActivationStore": "store", "Harvester": "store", "pack_contexts": "store", "separator_id": "store",
    "special_token_ids": "store",
})
