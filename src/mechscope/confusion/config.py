"""``ConfusionConfig``: the settings of a language-confusion run (no torch here: the CLI reads
the defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mechscope.errors import MechscopeError

LANGS = ("de", "es", "fr", "it")
"""Languages of the shipped prompt set (``confusion/data/prompts.jsonl``, 30 prompts each)."""

LID_LANGS = (
    "ace", "af", "am", "an", "ar", "ary", "arz", "as", "az", "ba", "bcl", "be", "bg", "bn", "br", "bs", "ca", "crh", "cs",
    "cy", "da", "de", "dz", "el", "en", "eo", "es", "et", "eu", "ext", "fa", "fi", "fo", "fr", "fuv", "fy", "ga", "gcf",
    "gcr", "gd", "gl", "gom", "grc", "gu", "gug", "guw", "ha", "hbo", "he", "hi", "hr", "ht", "hu", "hy", "id", "ig",
    "is", "it", "ja", "jv", "ka", "kab", "kik", "kk", "km", "kn", "ko", "ku", "ky", "la", "lb", "lg", "lij", "ln", "lo",
    "lt", "ltg", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "nso", "oc", "om", "or",
    "pa", "pcm", "pl", "ps", "pt", "qu", "ro", "ru", "rw", "sa", "sdh", "se", "si", "sk", "sl", "sn", "so", "sq", "sr",
    "st", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl", "tr", "tt", "ug", "uk", "ur", "uz", "uzs", "vec", "vi", "vo",
    "wa", "wuu", "xh", "yo", "yue", "zh", "zu",
)
"""Language codes the identifier (``py3langid`` 0.4) knows; a prompt's expected language must be
one of them and not English (there is nothing to confuse it with)."""


def check_langs(langs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The codes as a tuple, normalised (case, spaces and a region subtag dropped: "DE", " de ",
    "de-AT" and "de_DE" are all "de"), or one sentence naming the first that cannot be an
    expected language."""
    if not langs:
        raise MechscopeError("No languages given; pass codes such as de,es,fr,it.")
    if isinstance(langs, str) or not all(isinstance(c, str) for c in langs):
        raise MechscopeError(f"Languages must be a list of code strings such as ['de', 'es']; got {langs!r}.")
    given, langs = list(langs), [c.strip().lower().replace("_", "-").split("-")[0] for c in langs]
    for code, raw in zip(langs, given):
        if code == "en":
            raise MechscopeError("'en' cannot be an expected language: confusion is answering in English; pass other codes.")
        if code not in LID_LANGS:
            raise MechscopeError(f"Unknown language code '{raw}'; use ISO 639-1 codes the identifier knows, e.g. {', '.join(LANGS)}.")
    return tuple(langs)


@dataclass
class ConfusionConfig:
    """One run: generate, measure, find the neurons, edit them, measure again and the cost."""

    langs: tuple[str, ...] = LANGS
    """Expected languages to keep from the prompt set."""
    n_tokens: int = 64
    """Greedy new tokens per prompt (the paper: 100; 64 keeps a CPU run of the shipped set in minutes)."""
    top_n: int = 100
    """Neurons zeroed by the edit (the paper: 100)."""
    per_prompt: int = 300
    """Neurons kept per prompt when accumulating attribution scores (the paper: 300)."""
    last_layers: int = 0
    """Attribute and edit only the last K layers' neurons (0: all layers, as the paper)."""
    layers: tuple[int, ...] | None = None
    """Attribute and edit only these layers' neurons (None: ``last_layers``), e.g. every layer but
    the last, whose neurons English text needs too (README, "Language confusion")."""
    max_per_lang: int = 0
    """Prompts kept per language (0: all)."""
    batch_size: int = 16
    """Prompts generated together (left-padded)."""
    threshold: float = 0.3
    """Identifier probability below which a line's language is 'unknown' (the LCB: 0.3)."""
    min_words: int = 5
    """Lines with fewer words are skipped by the line-level metric (the LCB: 5)."""
    ioi_n: int = 100
    """IOI prompts for the cost of an edit (0: skip)."""
    facts_n: int = 0
    """Shipped facts (the first N) whose top-1 recall is the facts cost (0: all 301)."""
    ppl_contexts: int = 24
    """Held-out corpus contexts for the perplexity cost (0: skip)."""
    ppl_len: int = 128
    """Tokens per perplexity context (at most the model's context)."""
    seed: int = 0
    """Seeds the random-neuron control and the IOI draw."""
    english_budget: float | None = None
    """Spare the neurons English needs: walking down the ranking, a neuron is edited only if
    zeroing it alone raises the mean loss on English text (training split of the embedded corpus)
    by at most ``log(1 + budget) / top_n`` nats, its share of the budget; e.g. 0.02 for 2%
    perplexity (None: the plain top ``top_n``, as the paper). ``confusion.english``."""
    english_contexts: int = 4
    """Training-split corpus contexts (``ppl_len`` tokens) on which each neuron's zeroing is measured."""
    english_tries: int = 0
    """Neurons measured at most while sparing English (0: ten times ``top_n``)."""

    @property
    def max_tries(self) -> int:
        return self.english_tries or 10 * self.top_n

    def __post_init__(self) -> None:
        self.langs = check_langs(self.langs)
        # One sentence per value, naming the CLI option (cli/confusion.py) where there is one,
        # else the field (per_prompt, batch_size, threshold, min_words, ppl_len: Python only).
        if not 4 <= self.n_tokens <= 512:
            raise MechscopeError(f"--n-tokens must be between 4 and 512 (got {self.n_tokens}); give e.g. --n-tokens 64.")
        if self.top_n < 1:
            raise MechscopeError(f"--top-n must be at least 1 (got {self.top_n}); give the number of neurons to zero, e.g. --top-n 100.")
        if self.per_prompt < 1:
            raise MechscopeError(f"per_prompt must be at least 1 (got {self.per_prompt}); keep e.g. 300 neurons per prompt.")
        if self.last_layers < 0:
            raise MechscopeError(f"--last-layers must be 0 or more (got {self.last_layers}); 0 means all layers.")
        if self.max_per_lang < 0:
            raise MechscopeError(f"--max-per-lang must be 0 or more (got {self.max_per_lang}); 0 keeps all prompts.")
        if self.layers is not None:
            self.layers = tuple(sorted(set(int(x) for x in self.layers)))
            if not self.layers or self.layers[0] < 0:
                raise MechscopeError("--layers must name at least one layer, counted from 0 (e.g. --layers 0-28).")
            if self.last_layers:
                raise MechscopeError("Give either --layers or --last-layers, not both.")
        if self.batch_size < 1:
            raise MechscopeError(f"batch_size must be at least 1 (got {self.batch_size}).")
        if not 0.0 <= self.threshold < 1.0:
            raise MechscopeError(f"threshold must be in [0, 1) (got {self.threshold}).")
        if self.min_words < 1:
            raise MechscopeError(f"min_words must be at least 1 (got {self.min_words}).")
        if self.ioi_n < 0:
            raise MechscopeError(f"--ioi-n must be 0 or more (got {self.ioi_n}); 0 skips the IOI cost.")
        if self.facts_n < 0:
            raise MechscopeError(f"--facts-n must be 0 or more (got {self.facts_n}); 0 uses all shipped facts.")
        if self.ppl_contexts < 0:
            raise MechscopeError(f"--ppl-contexts must be 0 or more (got {self.ppl_contexts}); 0 skips the perplexity cost.")
        if self.english_budget is not None and not (0 < self.english_budget < 10):  # NaN fails too
            raise MechscopeError(f"--english-budget must be a relative perplexity increase above 0 and below 10 "
                                 f"(got {self.english_budget}); give e.g. --english-budget 0.02 for 2%.")
        if self.english_contexts < 1:
            raise MechscopeError(f"english_contexts must be at least 1 (got {self.english_contexts}).")
        if self.english_tries < 0:
            raise MechscopeError(f"english_tries must be 0 or more (got {self.english_tries}); 0 measures up to ten times --top-n.")
        if self.ppl_len < 8:
            raise MechscopeError(f"ppl_len must be at least 8 (got {self.ppl_len}).")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["langs"] = list(self.langs)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


def check_top_n(top_n: int, n_neurons: int) -> None:
    """One sentence when the edit asks for more neurons than the attributed layers hold."""
    if top_n > n_neurons:
        raise MechscopeError(f"--top-n {top_n} is more than the {n_neurons} neurons in the attributed layers; "
                             f"pass at most {n_neurons} (or attribute more layers).")
