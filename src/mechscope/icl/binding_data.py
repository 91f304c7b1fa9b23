"""Programs for the variable-binding setting (Wu, Geiger and Milliere 2025, "How do
transformers learn variable binding in symbolic programs?"), as word-level token sequences.

A program is ``<bos>`` then ``lines`` assignment lines of four tokens (``a = 3 ;`` or
``b = a ;``) then the query ``? b``; the answer, predicted at the last position, is the
constant that ``b`` holds after following its chain of references. Line ``i`` (from 0)
occupies positions ``1 + 4i`` (the assigned variable) to ``4 + 4i`` (``;``); its right-hand
side is at ``3 + 4i``; the query variable is the last position, ``2 + 4 * lines``.

Layout: the query chain (``depth`` lines: a constant, then each line copying the one before)
and distractor chains of 1..``hops`` lines fill the lines; which line holds which chain's
assignment is a random interleaving that keeps each chain in order. Variables are distinct
letters, so each is assigned once and read only after its assignment.

The early-line heuristic answers the constant on the first line (always a constant line).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mechscope.errors import MechscopeError
from mechscope.icl.binding_config import BindingDataConfig

BOS, EQ, SEP, QUERY = "<bos>", "=", ";", "?"
TOKENS_PER_LINE = 4

Layout = list[tuple[int, int]]
"""(chain, index in chain) of every line; chain 0 is the query chain."""


def variables(cfg: BindingDataConfig) -> list[str]:
    assert cfg.n_vars is not None  # set by BindingDataConfig.__post_init__
    return [chr(ord("a") + i) for i in range(cfg.n_vars)]


def constants(cfg: BindingDataConfig) -> list[str]:
    return [str(i) for i in range(cfg.n_consts)]


def vocabulary(cfg: BindingDataConfig) -> list[str]:
    """Every word, by token id: ``<bos> = ; ?``, the variables, the constants."""
    return [BOS, EQ, SEP, QUERY, *variables(cfg), *constants(cfg)]


def seq_len(cfg: BindingDataConfig) -> int:
    """Tokens of a program without its answer: BOS, the lines, ``?`` and the query variable."""
    return 1 + TOKENS_PER_LINE * cfg.lines + 2


def rhs_position(line: int) -> int:
    return 1 + TOKENS_PER_LINE * line + 2


def lhs_position(line: int) -> int:
    return 1 + TOKENS_PER_LINE * line


def make_tokenizer(cfg: BindingDataConfig):
    """A word-level tokenizer over ``vocabulary(cfg)`` (words split on whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary(cfg))}, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS)


@dataclass
class Program:
    lines: list[tuple[str, str]]
    """(assigned variable, right-hand side: a constant or a variable) per line"""
    query: str
    answer: str
    depth: int
    """lines followed from the query to its constant (1: the query holds a constant)"""
    layout: Layout

    @property
    def heuristic(self) -> str:
        """The early-line heuristic's answer: the constant on the first line."""
        return self.lines[0][1]

    def words(self) -> list[str]:
        out = [BOS]
        for lhs, rhs in self.lines:
            out += [lhs, EQ, rhs, SEP]
        return out + [QUERY, self.query]

    def text(self) -> str:
        return " ".join(self.words())

    def chain_lines(self) -> list[int]:
        """Lines of the query chain, from its constant to the query variable."""
        return [i for _, i in sorted((k, i) for i, (c, k) in enumerate(self.layout) if c == 0)]


def random_layout(cfg: BindingDataConfig, depth: int, rng: random.Random) -> Layout:
    """Chains (the query chain first, ``depth`` lines) interleaved at random over ``cfg.lines``."""
    if not 1 <= depth <= min(cfg.hops, cfg.lines):
        raise MechscopeError(f"The query chain's depth must be between 1 and --hops ({cfg.hops}); got {depth}.")
    lengths = [depth]
    left = cfg.lines - depth
    while left > 0:
        n = min(left, rng.randint(1, cfg.hops))
        lengths.append(n)
        left -= n
    order = [c for c, n in enumerate(lengths) for _ in range(n)]
    rng.shuffle(order)
    seen = [0] * len(lengths)
    layout = []
    for c in order:
        layout.append((c, seen[c]))
        seen[c] += 1
    return layout


def fill(cfg: BindingDataConfig, layout: Layout, rng: random.Random, root: str | None = None) -> Program:
    """Draw distinct variable names and root constants for ``layout`` (``root``: the query
    chain's constant, drawn when None)."""
    n_chains = 1 + max(c for c, _ in layout)
    names = rng.sample(variables(cfg), len(layout))
    consts = [rng.choice(constants(cfg)) for _ in range(n_chains)]
    if root is not None:
        consts[0] = root
    var_of: dict[tuple[int, int], str] = {}
    lines = []
    for i, (c, k) in enumerate(layout):
        var_of[(c, k)] = names[i]
        lines.append((names[i], consts[c] if k == 0 else var_of[(c, k - 1)]))
    depth = sum(1 for c, _ in layout if c == 0)
    return Program(lines, var_of[(0, depth - 1)], consts[0], depth, layout)


def with_root(cfg: BindingDataConfig, p: Program, root: str) -> Program:
    """``p`` with the query chain's constant replaced by ``root`` (one line differs)."""
    i = next(i for i, (c, k) in enumerate(p.layout) if c == 0 and k == 0)
    lines = list(p.lines)
    lines[i] = (lines[i][0], root)
    return Program(lines, p.query, root, p.depth, p.layout)


def sample(cfg: BindingDataConfig, n: int, rng: random.Random, depth: int | None = None) -> list[Program]:
    """``n`` programs; the query chain's depth uniform over 1..hops unless given."""
    return [fill(cfg, random_layout(cfg, depth or rng.randint(1, cfg.hops), rng), rng) for _ in range(n)]


def encode(cfg: BindingDataConfig, programs: list[Program]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, seq_len] (no answer) and answer ids [n]."""
    ids = {w: i for i, w in enumerate(vocabulary(cfg))}
    toks = torch.tensor([[ids[w] for w in p.words()] for p in programs], dtype=torch.long)
    ans = torch.tensor([ids[p.answer] for p in programs], dtype=torch.long)
    return toks, ans


def token_id(cfg: BindingDataConfig, word: str) -> int:
    return vocabulary(cfg).index(word)


class BindingData:
    """Training batches; each batch's programs come from a seed drawn from ``generator``
    (so saving the generator's state resumes the stream exactly)."""

    def __init__(self, cfg: BindingDataConfig):
        self.cfg = cfg

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return encode(self.cfg, sample(self.cfg, n, random.Random(seed)))

    def held_out(self, n: int, seed: int, depth: int | None = None) -> list[Program]:
        return sample(self.cfg, n, random.Random(f"held-out/{self.cfg.seed}/{seed}/{depth}"), depth)
