"""Two synthetic languages, L1 and L2, and the texts the embedded zoo is trained on.

L1 is a tiny English-like language of possession and arithmetic; L2 is a word-for-word cipher of
L1 (every non-digit word gets its own L2 token, digits are shared). This mirrors the published
cross-lingual merging setting (a math expert in one language, a language expert in another,
target: math in the second language) in miniature. ``../shared/ZOO.md`` records why the mixture
below works: pretraining code-switches *content words* only, which aligns the languages partly,
so neither expert alone solves L2 math but a merge can. Measured with the default config (seed 0,
900 held-out L2 math items): math expert 0.31, language expert 0.01, a per-layer task-arithmetic
merge 0.39 (math weights 1.29/1.09/1.29/0.45/0.04/1.01 and language weights
0.05/0.26/0.81/0.63/0.19/0.97 for embeddings/layers 1-4/head), the same math weights without the
language vector 0.34. Global task arithmetic gains little here (about +2 points at best).

All generators take a ``numpy.random.Generator`` so every text is a function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ["tom", "ann", "bob", "eve", "sam", "joe", "liz", "max"]
OBJECTS = ["apples", "pens", "books", "cups", "coins", "shoes"]
FUNCTION_WORDS = [
    "has", "gives", "to", "and", "gets", "more", "how", "many", "does", "have",
    "answer", "sees", "likes", "buys", "sells", "the", "with", ".", "?",
]
DIGITS = [str(d) for d in range(10)]
WORDS_L1 = NAMES + OBJECTS + FUNCTION_WORDS
CONTENT_WORDS = set(NAMES + OBJECTS)

# L2 words are fixed syllable strings: deterministic, distinct, and disjoint from L1.
_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu", "va", "ze", "bo", "di"]


def _l2_cipher() -> dict[str, str]:
    cipher = {}
    for i, word in enumerate(WORDS_L1):
        a, b = divmod(i, len(_SYLLABLES))
        cipher[word] = _SYLLABLES[a] + _SYLLABLES[b] + "x"
    return cipher


L2_OF = _l2_cipher()


@dataclass(frozen=True)
class Sentence:
    """A sentence as L1 words; rendering decides, word by word, which language to use."""

    words: tuple[str, ...]

    def render(self, rng: np.random.Generator | None = None, l2: bool = False, switch: float = 0.0) -> str:
        """Render in L1, fully in L2 (``l2=True``), or L1 with content words switched to L2."""
        out = []
        for w in self.words:
            if w.isdigit():
                out.append(w)
            elif l2:
                out.append(L2_OF[w])
            elif switch > 0 and w in CONTENT_WORDS and rng is not None and rng.random() < switch:
                out.append(L2_OF[w])
            else:
                out.append(w)
        return _join(out)




def _join(words: list[str]) -> str:
    # Numbers are written as one word ("42"); the tokenizer splits them into digits.
    return " ".join(words)


def _num(n: int) -> str:
    return str(n)


def generic_sentence(rng: np.random.Generator) -> Sentence:
    """A statement such as "tom has 12 apples ." or "ann gives 3 pens to bob ."."""
    a, b = rng.choice(NAMES, size=2, replace=False)
    obj = str(rng.choice(OBJECTS))
    k = _num(int(rng.integers(1, 100)))
    form = int(rng.integers(0, 6))
    if form == 0:
        words = [a, "has", k, obj, "."]
    elif form == 1:
        words = [a, "gives", k, obj, "to", b, "."]
    elif form == 2:
        words = [a, "and", b, "have", k, obj, "."]
    elif form == 3:
        words = [a, str(rng.choice(["sees", "likes"])), b, "with", "the", obj, "."]
    elif form == 4:
        words = [a, str(rng.choice(["buys", "sells"])), k, obj, "."]
    else:
        # The addition construction as a plain statement (no question, no sum): the base and the
        # language expert see "gets ... more" in L2 without ever seeing an L2 addition. Without
        # this form the L2 words of the construction are never trained, and the math expert then
        # transfers to L2 on its own (0.45) and global task-arithmetic merges with the language
        # expert only lose (measured, seed 0).
        words = [a, "has", k, obj, "and", "gets", _num(int(rng.integers(1, 100))), "more", "."]
    return Sentence(tuple(str(w) for w in words))


def reading_question(rng: np.random.Generator) -> tuple[Sentence, int]:
    """A question answered by copying: "tom has 12 apples . how many apples does tom have ? answer"."""
    a = str(rng.choice(NAMES))
    obj = str(rng.choice(OBJECTS))
    k = int(rng.integers(1, 100))
    words = [a, "has", _num(k), obj, ".", "how", "many", obj, "does", a, "have", "?", "answer"]
    return Sentence(tuple(words)), k


def math_question(rng: np.random.Generator) -> tuple[Sentence, int, int, int]:
    """An addition word problem; returns the question, its answer and both addends."""
    a = str(rng.choice(NAMES))
    obj = str(rng.choice(OBJECTS))
    x, y = (int(v) for v in rng.integers(1, 50, size=2))  # sums below 100: two digits at most
    words = [a, "has", _num(x), obj, "and", "gets", _num(y), "more", ".",
             "how", "many", obj, "does", a, "have", "?", "answer"]
    return Sentence(tuple(words)), x + y, x, y


def with_answer(text: str, answer: int) -> str:
    return f"{text} {answer}"


# --- training corpora -------------------------------------------------------------------------

def pretraining_text(rng: np.random.Generator) -> str:
    """One pretraining sequence for the base: mostly L1, a little L2, code-switched content words."""
    u = rng.random()
    if u < 0.05:  # pure L2 sentences (kept rare: more L2 lets the math expert transfer alone)
        return generic_sentence(rng).render(l2=True)
    if u < 0.35:  # L1 with content words switched to L2
        return generic_sentence(rng).render(rng, switch=0.5)
    if u < 0.55:  # reading questions, answer copied, content words switched too
        q, k = reading_question(rng)
        return with_answer(q.render(rng, switch=0.5), k)
    return generic_sentence(rng).render()


def math_l1_text(rng: np.random.Generator) -> str:
    """Fine-tuning text of the math expert: L1 addition problems with their answers."""
    q, s, _, _ = math_question(rng)
    return with_answer(q.render(), s)


def lang_l2_text(rng: np.random.Generator) -> str:
    """Fine-tuning text of the language expert: L2 sentences and L2 reading questions."""
    if rng.random() < 0.7:  # mostly generic L2, so the expert learns L2 more than copying
        return generic_sentence(rng).render(l2=True)
    q, k = reading_question(rng)
    return with_answer(q.render(l2=True), k)


CORPORA = {"pretrain": pretraining_text, "math_l1": math_l1_text, "lang_l2": lang_l2_text}


# --- evaluation tasks -------------------------------------------------------------------------

def _mc_choices(rng: np.random.Generator, answer: int, distractors: list[int]) -> tuple[list[str], int]:
    """Shuffle the answer among distinct distractors; returns choices and the answer's index."""
    options = [answer]
    for d in distractors:
        if d not in options and d >= 0:
            options.append(d)
    while len(options) < 4:
        cand = int(rng.integers(0, 120))
        if cand not in options:
            options.append(cand)
    order = rng.permutation(len(options))
    choices = [str(options[i]) for i in order]
    return choices, int(np.where(order == 0)[0][0])


def task_items(name: str, n: int, rng: np.random.Generator) -> list[dict]:
    """Items of a synthetic task: ``question``, ``choices``, ``answer`` (index), ``target`` (text)."""
    items = []
    for i in range(n):
        if name in ("math_l1", "math_l2"):
            q, s, x, y = math_question(rng)
            choices, idx = _mc_choices(rng, s, [x, y, s + 1])
            text = q.render(l2=name == "math_l2")
        elif name in ("read_l1", "read_l2"):
            q, k = reading_question(rng)
            other = int(rng.integers(1, 100))
            choices, idx = _mc_choices(rng, k, [other, k + 1, max(k - 1, 0)])
            text = q.render(l2=name == "read_l2")
        else:
            raise ValueError(f"unknown synthetic task {name!r}; known: {sorted(SYNTHETIC_TASKS)}")
        items.append({"item_id": f"{name}-{i:05d}", "question": text, "choices": choices,
                      "answer": idx, "target": choices[idx]})
    return items


SYNTHETIC_TASKS = ("math_l1", "math_l2", "read_l1", "read_l2")


def vocabulary() -> list[str]:
    """Every word of both languages, L1 then L2, without digits."""
    return WORDS_L1 + [L2_OF[w] for w in WORDS_L1]
