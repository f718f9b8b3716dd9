"""The first-letter prompts of SAEBench 0.6.0's absorption eval (evals/absorption: vocab.py, prompting.py) and the
LM's activations at their word: what feature absorption (csc/pipeline/absorption.py) probes.

Words are the tokenizer's tokens whose text is ASCII letters only, after at most one leading word-boundary marker
(SentencePiece's and byte-level BPE's space: SAEBench's get_alpha_tokens, which decodes each token and allows one
leading space). A word's letter is its first letter, case ignored. A prompt for word w (SAEBench's create_icl_prompt
with its eval's settings: template "{word} has the first letter:", answer " " + the upper-case letter, separator
"\\n" also before the first example, BOS first, 10 in-context examples drawn from a pool without w) is

    <bos> \\n e_1 has the first letter: E_1 \\n ... e_10 has the first letter: E_10 \\n w has the first letter:

and the activation read is resid_post of the spec's layer at w's token (SAEBench's prompt_token_pos -6 on Gemma's
tokenizer, where the template's tail is 5 tokens). Only the tokens up to w reach that position (the LM is causal),
so the tail is never computed.

Where csc departs from SAEBench (the second, to run on 2 CPU cores):
- Prompts are built from token ids (w's token, then the template's pieces tokenised apart), not by tokenising the
  prompt's text, so that w is one token at a known position whatever its neighbours; the two agree where the
  tokenizer merges nothing across the pieces' boundaries (Gemma 3's does not across "\\n" and a word after a space).
- PROMPTS_PER_PREFIX consecutive words share one draw of in-context examples (drawn from the pool less all of them),
  and the LM reads that prefix once for all of them (csc.activations.capture.run_after_prefixes: each word at the
  position after the prefix, attending to it and to itself only): (P + 64) / 64 positions per word (2.4 at Gemma 3's
  P = 92) instead of P + 6. Each word's draw is still uniform over the pool less itself; words of one group are
  only correlated. SAEBench draws every prompt's examples apart.
- A pool smaller than its words plus 10 examples (a tiny tokenizer's) gives groups of one word and as many
  examples as the pool holds beside it.

Memory: one LM pass reads activations.lm_batch_size rows of P + 64 positions (16 x 156 on Gemma 3), about a shard
batch's 16 x 128.
"""

from __future__ import annotations

import random
import string
from itertools import groupby
from typing import TYPE_CHECKING

import torch

from csc.activations.capture import run_after_prefixes
from csc.activations.models import LanguageModel
from csc.activations.probe_labels import LETTERS, WORD_MARKERS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_TAIL = " has the first letter:"
"""What follows the word in SAEBench's template "{word} has the first letter:"."""
SEPARATOR = "\n"
ICL_EXAMPLES = 10
"""In-context examples per prompt (SAEBench's max_icl_examples)."""
PROMPTS_PER_PREFIX = 64
"""Words that share one draw of in-context examples, and the LM's reading of that prefix."""


def alpha_words(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(token ids ascending, letter index of each) of the tokenizer's words (module docstring)."""
    ids, letters = [], []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = token[1:] if token[:1] and token[0] in WORD_MARKERS + " " else token
        if text and all(c in string.ascii_letters for c in text):
            ids.append(i)
            letters.append(LETTERS.index(text[0].lower()))
    return ids, letters


class FirstLetterPrompts:
    """SAEBench's first-letter ICL prompts over one tokenizer's words, as token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, start_id: int, letter_of: dict[int, int]):
        def ids(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        self.start, self.letter_of = start_id, letter_of
        self.separator, self.tail = ids(SEPARATOR), ids(TEMPLATE_TAIL)
        self.answers = [ids(" " + c.upper()) for c in LETTERS]

    def prefix(self, examples: list[int]) -> list[int]:
        """Everything before the word: BOS, the separator, and each example with its answer and a separator."""
        out = [self.start, *self.separator]
        for e in examples:
            out += [e, *self.tail, *self.answers[self.letter_of[e]], *self.separator]
        return out


@torch.no_grad()
def word_activations(lm: LanguageModel, layer: int, prompts: FirstLetterPrompts, words: list[int], pool: list[int],
                     rng: random.Random, lm_batch_size: int) -> torch.Tensor:
    """[len(words), d] float32: resid_post of `layer` at each word of its prompt, in-context examples drawn by `rng`
    from `pool` (module docstring). `lm_batch_size` prefixes per LM pass."""
    size = min(PROMPTS_PER_PREFIX, max(1, len(pool) - ICL_EXAMPLES))
    groups = []  # (prefix, first row, words)
    for s in range(0, len(words), size):
        group = words[s:s + size]
        taken = set(group)
        others = [w for w in pool if w not in taken]
        groups.append((prompts.prefix(rng.sample(others, min(ICL_EXAMPLES, len(others)))), s, group))
    out = torch.empty(len(words), lm.d_model)
    # One pass takes prefixes of one length (answers of some letters may have more tokens) and groups of one size.
    groups.sort(key=lambda g: (len(g[0]), len(g[2])))
    for _, same in groupby(groups, key=lambda g: (len(g[0]), len(g[2]))):
        same = list(same)
        for b in range(0, len(same), lm_batch_size):
            batch = same[b:b + lm_batch_size]
            resid = run_after_prefixes(lm.model, torch.tensor([p for p, _, _ in batch], device=lm.device),
                                       torch.tensor([g for _, _, g in batch], device=lm.device), layer)
            for (_, s, group), r in zip(batch, resid):
                out[s:s + len(group)] = r.float().cpu()
    return out
