"""Indirect object identification (IOI), after Wang et al. 2022, "Interpretability in the Wild:
a Circuit for Indirect Object Identification in GPT-2 small" (arXiv:2211.00593).

Construction (one pair per example):

- A template mentions two names, then repeats one of them (the subject S) and stops right
  before the indirect object (IO), e.g. "Then, Mary and John went to the store. John gave a
  drink to". Half the examples use the BABA order (S first: "B and A ... B ... to A"), half
  the ABBA order (IO first: "A and B ... B ... to A"), alternating.
- Clean prompt: IO once, S twice. ``answer`` = " IO", ``wrong`` = " S"; metric ``logit_diff``
  at the last position (logit of IO minus logit of S).
- Corrupt prompt: the paper's ABC distribution, i.e. the same template, place and object with
  three new names C, D, E (all different from each other and from A and B) in the three name
  slots, so no name is repeated and nothing says which name is the indirect object.
- Names come from a list of common English first names; at build time only those that are a
  single token with a leading space after a prompt's last word ("to", ``NAME_CONTEXT``) in the
  given tokenizer are kept, so clean and corrupt prompts always have the same token length.

The templates, places and objects below are our own, written in the style of the paper's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.tasks.base import Pair, TaskBatch, single_token, tokenize_pairs

# {n1} and {n2}: the first two mentions; {s2}: the repeated subject; prompts end before the IO.
TEMPLATES: list[str] = [
    "Then, {n1} and {n2} went to the {place}. {s2} gave a {obj} to",
    "Then, {n1} and {n2} had a great time at the {place}. {s2} handed a {obj} to",
    "After {n1} and {n2} arrived at the {place}, {s2} gave a {obj} to",
    "When {n1} and {n2} got to the {place}, {s2} passed a {obj} to",
    "While {n1} and {n2} were working at the {place}, {s2} gave a {obj} to",
    "Later, {n1} and {n2} were sitting in the {place}. {s2} offered a {obj} to",
    "Yesterday, {n1} and {n2} walked to the {place}. {s2} brought a {obj} to",
    "On Monday, {n1} and {n2} went to the {place}, and {s2} gave a {obj} to",
    "Once {n1} and {n2} had reached the {place}, {s2} threw a {obj} to",
    "Afterwards, {n1} and {n2} went to the {place}. {s2} sent a {obj} to",
    "That morning, {n1} and {n2} met at the {place}. {s2} gave a {obj} to",
    "When {n1} and {n2} found a {obj} at the {place}, {s2} gave it to",
    "After lunch, {n1} and {n2} went to the {place}. {s2} showed a {obj} to",
    "Then, {n1} and {n2} were cleaning the {place}. {s2} gave a {obj} to",
    "Friends {n1} and {n2} spent the day at the {place}. {s2} sold a {obj} to",
    "In the evening, {n1} and {n2} stayed at the {place}. {s2} lent a {obj} to",
]

PLACES: list[str] = [
    "store", "park", "school", "hospital", "station", "garden", "office", "beach", "market",
    "library", "restaurant", "museum", "house", "kitchen", "church", "farm", "river", "hotel",
]

# Objects start with a consonant sound so "a {obj}" is grammatical.
OBJECTS: list[str] = [
    "drink", "book", "ring", "ball", "basketball", "computer", "necklace", "kite", "bone",
    "snack", "bag", "watch", "pen", "letter", "cake", "hat", "key", "phone", "box", "gift",
]

NAMES: list[str] = [
    "Mary", "John", "James", "Robert", "Michael", "William", "David", "Richard", "Joseph",
    "Thomas", "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew",
    "Kevin", "Brian", "George", "Edward", "Jason", "Ryan", "Jacob", "Eric", "Jonathan",
    "Stephen", "Justin", "Scott", "Frank", "Benjamin", "Samuel", "Patrick", "Alexander", "Jack",
    "Tyler", "Aaron", "Henry", "Adam", "Peter", "Nathan", "Walter", "Jeremy", "Ethan", "Carl",
    "Sean", "Arthur", "Noah", "Jesse", "Joe", "Albert", "Bruce", "Gabriel", "Alan", "Louis",
    "Philip", "Vincent", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan",
    "Jessica", "Sarah", "Karen", "Nancy", "Lisa", "Betty", "Margaret", "Sandra", "Ashley",
    "Emily", "Michelle", "Carol", "Amanda", "Melissa", "Stephanie", "Rebecca", "Laura",
    "Amy", "Angela", "Helen", "Anna", "Nicole", "Emma", "Samantha", "Rachel", "Catherine",
    "Ruth", "Maria", "Julie", "Victoria", "Olivia", "Kelly", "Lauren", "Hannah", "Alice",
    "Grace", "Sophia", "Lucy", "Rose", "Kate", "Jane", "Tom", "Sam", "Max",
]


@dataclass
class IOIExample:
    """One IOI example: its names, template and order (for tests and reports)."""

    template: str
    place: str
    obj: str
    io: str  # indirect object (the answer)
    s: str  # subject (mentioned twice)
    order: str  # "BABA" or "ABBA"
    corrupt_names: tuple[str, str, str]  # names in slots n1, n2, s2 of the ABC prompt
    clean: str
    corrupt: str


NAME_CONTEXT = "Mary gave a drink to"
"""A prompt the names are tried after (``single_token`` decides in context)."""


def single_token_names(tokenizer: Any, names: list[str] = NAMES, prompt: str = NAME_CONTEXT) -> list[str]:
    """The names that are one token with a leading space after ``prompt`` (order kept)."""
    return [n for n in names if single_token(tokenizer, " " + n, prompt) is not None]


def make_examples(tokenizer: Any, n: int = 50, seed: int = 0) -> list[IOIExample]:
    """``n`` IOI examples, alternating BABA and ABBA, deterministic given ``seed``."""
    names = single_token_names(tokenizer)
    if len(names) < 5:
        raise MechscopeError(
            "IOI needs at least 5 first names that are single tokens in this tokenizer; "
            f"found {len(names)}."
        )
    rng = random.Random(seed)
    out: list[IOIExample] = []
    for i in range(n):
        template = rng.choice(TEMPLATES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        io, s, c, d, e = rng.sample(names, 5)
        order = "BABA" if i % 2 == 0 else "ABBA"
        n1, n2 = (s, io) if order == "BABA" else (io, s)
        clean = template.format(n1=n1, n2=n2, s2=s, place=place, obj=obj)
        corrupt = template.format(n1=c, n2=d, s2=e, place=place, obj=obj)
        out.append(IOIExample(template, place, obj, io, s, order, (c, d, e), clean, corrupt))
    return out


def build(tokenizer: Any, n: int = 50, seed: int = 0) -> TaskBatch:
    """IOI batch: clean (IO once, S twice) vs ABC corrupt; metric logit_diff(IO - S)."""
    examples = make_examples(tokenizer, n, seed)
    pairs = [Pair(ex.clean, ex.corrupt, " " + ex.io, " " + ex.s) for ex in examples]
    return tokenize_pairs(tokenizer, pairs, "ioi", "logit_diff")
