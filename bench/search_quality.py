"""Full-text vs semantic search on queries that paraphrase descriptions: recall@1, recall@10
and MRR of the right unit, and the time per query, both methods in one process on one database.

The database: ``--units`` MLP units (default 46,080, the embedded model's 30 x 1,536 neurons).
``TARGETS`` units get a hand-written description of the kind an explainer writes; every other
unit gets a distractor description drawn from templates over the same topic vocabulary, so a
query's words also occur in many wrong descriptions. All descriptions carry the same score, so
the ranking is the retrieval alone. Two query sets per target:

- ``paraphrase``: the concept said in other words (few or no shared content words), the case
  semantic search is for;
- ``keyword``: a query sharing the description's key word, the case full-text search is for.

Methods: ``fts`` (``UnitDB.search``: FTS5 bm25, porter stemming), ``minilm`` (all-MiniLM-L6-v2),
and with ``--embedded`` the embedded model's middle-layer residuals (slow to embed 46k texts on a
CPU; try ``--units 5000``).

    python bench/search_quality.py [--units 46080] [--embedded]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from mechscope.explain.db import UnitDB
from mechscope.explain.semantic import embed_descriptions, get_embedder, semantic_search
from mechscope.explain.types import Description, UnitRecord, UnitRef

# (description as an explainer writes it, paraphrased query, keyword query)
TARGETS = [
    ("names of cities such as Paris, London and Tokyo", "towns and metropolitan areas", "cities"),
    ("closing parentheses at the end of function calls", "the bracket that ends an argument list", "parentheses"),
    ("the month names January through December", "calendar periods like March or October", "months"),
    ("plural nouns ending in -s", "words referring to more than one thing", "plural"),
    ("negation words such as not, never and no", "terms that deny or contradict a statement", "negation"),
    ("female first names like Mary and Sarah", "given names of women", "names"),
    ("years written as four digits, e.g. 1999 and 2024", "calendar dates given as a number like 1850", "years"),
    ("Python keywords def, return and import", "reserved words of a programming language", "keywords"),
    ("colour adjectives such as red, blue and green", "words naming hues", "colour"),
    ("animals, especially dogs and cats", "pets and other creatures", "animals"),
    ("food and cooking ingredients", "things you eat and recipes", "food"),
    ("musical instruments like guitar and piano", "tools for playing songs", "instruments"),
    ("legal terms in contracts and court rulings", "vocabulary of lawyers and judges", "legal"),
    ("medical symptoms and diseases", "illness and what a doctor diagnoses", "medical"),
    ("question words at the start of a sentence: what, why, how", "interrogative openers", "question"),
    ("quotation marks opening a direct quote", "the punctuation before someone's spoken words", "quotation"),
    ("URLs and web addresses", "links to internet pages like https://example.com", "URLs"),
    ("emotions such as anger, joy and fear", "feelings people have", "emotions"),
    ("sports teams and football matches", "athletic competitions and clubs", "sports"),
    ("chemical elements like oxygen and carbon", "entries of the periodic table", "chemical"),
    ("verbs in the past tense", "actions that already happened", "past"),
    ("country names, e.g. France and Japan", "nations of the world", "country"),
    ("mathematical operators plus and minus", "symbols for arithmetic", "operators"),
    ("weather words: rain, snow, sunny", "the climate outside today", "weather"),
    ("body parts such as hand, head and heart", "human anatomy", "body"),
    ("money amounts with dollar signs", "prices and sums of cash", "money"),
    ("the word 'the' after a preposition", "a definite article following in, on or at", "preposition"),
    ("religious terms: god, church, prayer", "faith and worship", "religious"),
    ("family relations: mother, brother, aunt", "relatives and kin", "family"),
    ("programming error messages and exceptions", "stack traces when software crashes", "error"),
    ("units of measurement like kilometres and kilograms", "how distance and weight are quantified", "units"),
    ("vehicles: cars, trains and planes", "means of transport", "vehicles"),
    ("days of the week", "Monday, Tuesday and so on", "days"),
    ("political parties and elections", "voting and government campaigns", "elections"),
    ("ordinal numbers first, second, third", "position in a ranking order", "ordinal"),
    ("HTML tags in web page source", "markup elements like div and span", "HTML"),
    ("surnames following a first name", "family names of people", "surnames"),
    ("music genres such as jazz and rock", "styles of songs", "genres"),
    ("the end of a sentence: full stops", "periods that finish a statement", "sentence"),
    ("verbs of speaking: said, told, asked", "reporting what someone uttered", "speaking"),
]

TOPICS = ("cities months names years keywords colour animals food instruments legal medical emotions sports chemical "
          "country operators weather body money religious family error units vehicles days elections numbers HTML "
          "genres verbs nouns adjectives adverbs pronouns articles commas brackets digits code tokens words phrases "
          "letters spaces newlines quotes dates titles places people objects actions").split()
TEMPLATES = ("{a} and {b} in {c} text", "mentions of {a} near {b}", "{a} tokens after {b}", "the first {a} of a {c} line",
             "{a}, mostly in {b} contexts", "repeated {a} in lists of {b}", "{a} or {b} at the start of {c} documents")


def build(path: Path, n_units: int, seed: int = 0) -> dict[str, UnitRef]:
    """The benchmark database; returns the target unit of each target description."""
    rng = random.Random(seed)
    db = UnitDB(path, model_id="synthetic-search-bench")
    refs = [UnitRef("mlp", i // 1536, i % 1536) for i in range(n_units)]
    db.put_units(UnitRecord(r, 1.0, 0.0, 0.01) for r in refs)
    target_units = rng.sample(refs, len(TARGETS))
    where = {t[0]: u for t, u in zip(TARGETS, target_units)}
    chosen = set(target_units)
    for r in refs:
        if r in chosen:
            continue
        a, b, c = rng.sample(TOPICS, 3)
        db.put_description(Description(r, rng.choice(TEMPLATES).format(a=a, b=b, c=c), "baseline", scores={"simulation": 0.5}))
    for (text, _, _), u in zip(TARGETS, target_units):
        db.put_description(Description(u, text, "baseline", scores={"simulation": 0.5}))
    db.close()
    return where


def evaluate(search, where: dict[str, UnitRef], which: int) -> dict[str, float]:
    """recall@1, recall@10, MRR (over the top 50) and the median seconds per query."""
    r1 = r10 = mrr = 0.0
    times = []
    for t in TARGETS:
        t0 = time.perf_counter()
        hits = search(t[which])
        times.append(time.perf_counter() - t0)
        keys = [h.unit for h in hits]
        rank = keys.index(where[t[0]]) + 1 if where[t[0]] in keys else None
        r1 += rank == 1
        r10 += rank is not None and rank <= 10
        mrr += 1 / rank if rank else 0.0
    n = len(TARGETS)
    return {"recall@1": r1 / n, "recall@10": r10 / n, "mrr": mrr / n, "median_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=46_080)
    ap.add_argument("--embedded", action="store_true", help="also the embedded model's residual embeddings (slow on CPU)")
    ap.add_argument("--keep", default=None, help="keep the database at this path")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="search-bench-")
    path = Path(a.keep) if a.keep else Path(tmp) / "units.db"
    if path.exists():
        path.unlink()
    t0 = time.perf_counter()
    where = build(path, a.units)
    print(f"{platform.machine()} {os.cpu_count()} CPUs; {a.units:,} units, {len(TARGETS)} targets; database built in "
          f"{time.perf_counter() - t0:.1f} s")
    db = UnitDB(path)
    methods = {"fts": lambda q: db.search(q, limit=50)}
    for name in ["minilm"] + (["embedded"] if a.embedded else []):
        emb = get_embedder(name)
        t0 = time.perf_counter()
        n = embed_descriptions(path, emb)
        secs = time.perf_counter() - t0
        print(f"{name}: embedded {n:,} descriptions in {secs:.1f} s ({n / secs:.0f}/s)")
        semantic_search(db, "warm up", emb, limit=1)  # loads the matrix once
        methods[name] = lambda q, emb=emb: semantic_search(db, q, emb, limit=50)
    print(f"\n{'method':10s} {'queries':10s} {'recall@1':>9s} {'recall@10':>10s} {'MRR':>6s} {'ms/query':>9s}")
    for name, fn in methods.items():
        for which, label in ((1, "paraphrase"), (2, "keyword")):
            r = evaluate(fn, where, which)
            print(f"{name:10s} {label:10s} {r['recall@1']:9.2f} {r['recall@10']:10.2f} {r['mrr']:6.2f} {r['median_s'] * 1000:9.1f}")
    # The brute-force cosine alone (the matrix product), to show it is not the cost.
    from mechscope.explain.semantic import _CACHE

    for (_, emb_name, _), (_, mat) in _CACHE.items():
        q = mat.normed[0].copy()
        t0 = time.perf_counter()
        for _ in range(20):
            _ = mat.normed @ q
        print(f"\nbrute-force cosine over {len(mat.ids):,} x {mat.normed.shape[1]} float32 ({emb_name}): "
              f"{(time.perf_counter() - t0) / 20 * 1000:.1f} ms per query ({mat.normed.nbytes / 2**20:.0f} MiB)")
    import numpy as np

    big = np.random.default_rng(0).standard_normal((46_080, 384), dtype=np.float32)
    q = big[0].copy()
    t0 = time.perf_counter()
    for _ in range(20):
        order = np.argsort(-(big @ q))[:50]
    print(f"brute-force cosine + full sort at 46,080 x 384 float32 (random vectors): "
          f"{(time.perf_counter() - t0) / 20 * 1000:.1f} ms per query ({big.nbytes / 2**20:.0f} MiB); top {len(order)}")


if __name__ == "__main__":
    main()
