"""Activations: text corpora, a streaming activation store, and on-disk shards.

From a notebook::

    from mechscope.activations import get_corpus, StoreConfig, ActivationStore
    store = ActivationStore(model, get_corpus(split="train"), StoreConfig(hooks=["blocks.6.hook_resid_post"]))
    batch = store.next_batch(4096)            # {"blocks.6.hook_resid_post": [4096, 576]}
    harvest(model, get_corpus(), cfg, "acts", n_tokens=1_000_000)   # shards on disk, resumable
    batch = ShardStore("acts").next_batch(4096)                      # the same API, from disk
"""

from mechscope.activations.corpus import Corpus, get_corpus
from mechscope.activations.shards import ShardStore, harvest
from mechscope.activations.store import ActivationStore, Harvester, StoreConfig, pack_contexts, separator_id

__all__ = [
    "ActivationStore", "Corpus", "Harvester", "ShardStore", "StoreConfig", "get_corpus", "harvest",
    "pack_contexts", "separator_id",
]
