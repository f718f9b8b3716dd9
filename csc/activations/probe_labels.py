"""The sparse-probing set: which held-out contexts, which of their tokens form each example, and its class.

Everything here follows from the corpus, the tokenizer and the context construction (csc.activations.contexts):
no LM and nothing stored in the shards, so the cache format is unchanged. The sweep's producer, which holds the
tokenizer, computes it once; trials pool their codes over it (csc.pipeline.probing).

Two tasks, each a set of examples; an example pools (means) the codes of its tokens, as SAEBench mean-pools a
text over its non-special tokens:

    seq     sequence level: the part of one document within one context (BOS, EOS and other special tokens left
            out), when it has >= eval.probe_min_tokens tokens; its class is the document's label (the genre of an
            embedded work, else corpus.label_field). Looked for in the first eval.probe_scan_tokens held-out
            tokens. Absent when the corpus has no labels.
    letter  token level: one token each, classed by the first letter of its text (leading whitespace and the
            tokenizer's word-boundary marker dropped, case ignored; a token whose text starts otherwise has no
            class), over the probing contexts (below).

Every class takes its first n_test = round(eval.probe_test_fraction * eval.probe_examples_per_class) examples (at
least 1, at most n - 1) in probe-test contexts and its first n_fit = probe_examples_per_class - n_test in probe-fit
contexts, in stream order; context i is a probe-test context when i % round(1 / probe_test_fraction) is the last
residue, so fit and test examples never share a context. A class short of either quota is left out. The probing
contexts are every context of the evaluation's shards and of the held-out shards that hold the chosen seq examples
(shards are what the LM computes and caches).

On the embedded default (holdout 0.1, context 128) the held-out documents are Henry V (history, ~337 contexts),
Macbeth (tragedy, ~239), The Rape of Lucrece (poem, ~181) and Twelfth Night (comedy, ~272), in that order: the
evaluation's first shards hold Henry V alone, so the seq task reads shards further along the held-out stream, and
its 4 classes are these 4 works, 102 probe-fit and 26 probe-test contexts each (held-out shards 0-2, 5-7 and 9-13
of 64 contexts). The letter task finds 128 tokens of every letter but x and z in them.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from csc.activations.contexts import ContextStream
from csc.activations.corpus import labelled_documents
from csc.config import EMBEDDED, ActivationsRunSpec, CorpusSpec, EvalSpec
from csc.errors import CscError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SEQ, LETTER = "seq", "letter"
TASKS = ((SEQ, "sequence label"), (LETTER, "first letter"))
"""(name, what it asks) of the tasks; `seq` only on a corpus with labels."""
WORD_MARKERS = "\u2581\u0120"
"""SentencePiece's word-boundary marker and byte-level BPE's space, which start a word's token."""
LETTERS = string.ascii_lowercase
"""The classes of the letter task."""


@dataclass(frozen=True)
class ProbeTask:
    name: str
    classes: tuple[str, ...]
    example: torch.Tensor
    """[n, T] int64: the example each token of the probing contexts is pooled into; -1 for none."""
    label: torch.Tensor
    """[E] int64: each example's class (index into `classes`)."""
    test: torch.Tensor
    """[E] bool: whether the example is a probe-test example (its context is a probe-test context)."""


@dataclass(frozen=True)
class ProbeLabels:
    seq_id: torch.Tensor
    """[n] int64: the probing contexts, indices of the held-out split, ascending (whole shards)."""
    tokens: torch.Tensor
    """[n, T] int64: their tokens, to check against the shards' (the labels are only valid for these tokens)."""
    tasks: tuple[ProbeTask, ...]

    def shards(self, contexts_per_shard: int) -> list[int]:
        return sorted(set((self.seq_id // contexts_per_shard).tolist()))


def task_names(corpus: CorpusSpec) -> tuple[str, ...]:
    """The tasks a spec with this corpus probes: `seq` only where its documents have labels."""
    labelled = corpus.source == EMBEDDED or corpus.label_field is not None
    return tuple(name for name, _ in TASKS if labelled or name != SEQ)


def special_ids(tokenizer: PreTrainedTokenizerBase, start_id: int) -> frozenset[int]:
    """SAEBench's ignore_tokens, the tokenizer's PAD, EOS and BOS, with the token csc starts contexts with."""
    return frozenset(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, start_id)
                     if i is not None)


def letter_classes(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> torch.Tensor:
    """0..25 for the token ids whose text starts with a letter a..z (see the module docstring), -1 otherwise."""
    unique, inverse = ids.unique(return_inverse=True)
    first = [t.lstrip(WORD_MARKERS + string.whitespace)[:1].lower()
             for t in tokenizer.convert_ids_to_tokens(unique.tolist())]
    table = torch.tensor([LETTERS.index(f) if f and f in LETTERS else -1 for f in first], dtype=torch.int64)
    return table[inverse]


def probe_labels(spec: ActivationsRunSpec, probe: EvalSpec, eval_shards: int, tokenizer: PreTrainedTokenizerBase,
                 start_id: int, ignore: frozenset[int]) -> ProbeLabels:
    """The probing set of `spec`'s held-out split (module docstring); `eval_shards`: the evaluation's shards,
    `start_id`: the token contexts start with, `ignore`: the tokens never pooled (special_ids)."""
    a = spec.activations
    S, T = a.contexts_per_shard, a.context_length
    doc_labels: list[str | None] = []

    def texts():
        for text, label in labelled_documents(spec.corpus, "eval"):
            doc_labels.append(label)
            yield text

    stream = ContextStream(texts(), tokenizer, start_id, T, what=f"corpus.source {spec.corpus.source!r} (eval part)")
    labelled = SEQ in task_names(spec.corpus)
    scan = max(probe.probe_scan_tokens // (S * T) if labelled else 0, eval_shards) * S
    # Whole shards (the LM computes a shard whole), the evaluation's at least (get raises if they do not exist).
    n = max(stream.available(scan) // S, eval_shards) * S
    tokens, docs = stream.get(0, n), stream.documents_of(0, n)
    every = max(2, round(1 / probe.probe_test_fraction))
    test_ctx = torch.arange(n) % every == every - 1
    N = probe.probe_examples_per_class
    n_test = min(max(round(probe.probe_test_fraction * N), 1), N - 1)  # a probe needs examples on both sides
    quota = (N - n_test, n_test)  # (fit, test) examples of every class
    pooled = ~torch.isin(tokens, torch.tensor(sorted(ignore))) & (docs >= 0)

    seq = None
    if labelled:
        seq = _sequence_task(docs, pooled, doc_labels, test_ctx, quota, probe.probe_min_tokens)
        _check_classes(probe, SEQ, seq, "genres of the held-out works" if spec.corpus.source == EMBEDDED
                       else "corpus.label_field", f"the first {n} held-out contexts (eval.probe_scan_tokens)")
    chosen = set() if seq is None else set((seq.context // S).tolist())
    rows = torch.cat([torch.arange(i * S, (i + 1) * S) for i in sorted({*range(eval_shards), *chosen})])
    letter = _token_task(letter_classes(tokenizer, tokens[rows]), pooled[rows], test_ctx[rows], quota)
    _check_classes(probe, LETTER, letter, "first letters of tokens", f"the {len(rows)} probing contexts")
    tasks = [] if seq is None else [seq.task(SEQ, rows)]
    return ProbeLabels(seq_id=rows, tokens=tokens[rows], tasks=(*tasks, letter.task(LETTER, None)))


@dataclass
class _Examples:
    classes: list[str]
    example: torch.Tensor  # [n, T] over the contexts it was chosen from
    label: torch.Tensor
    context: torch.Tensor  # [E] row of each example's context
    test: torch.Tensor

    def task(self, name: str, rows: torch.Tensor | None) -> ProbeTask:
        """As a ProbeTask over `rows` of the contexts it was chosen from (None: all of them)."""
        example = self.example if rows is None else self.example[rows]
        return ProbeTask(name, tuple(self.classes), example, self.label, self.test)


def _sequence_task(docs: torch.Tensor, pooled: torch.Tensor, doc_labels: list[str | None], test_ctx: torch.Tensor,
                   quota: tuple[int, int], min_tokens: int) -> _Examples:
    """Document parts of >= min_tokens pooled tokens, per class the first quota[side] of each side."""
    taken: dict[tuple[str, bool], int] = {}
    parts: list[tuple[int, int, str]] = []  # (context, document, label), in stream order
    for i in range(docs.shape[0]):
        side = bool(test_ctx[i])
        ids, counts = docs[i][pooled[i]].unique(return_counts=True)
        for k, c in zip(ids.tolist(), counts.tolist()):
            label = doc_labels[k]
            if label is not None and c >= min_tokens and taken.get((label, side), 0) < quota[side]:
                taken[label, side] = taken.get((label, side), 0) + 1
                parts.append((i, k, label))
    classes = sorted({lab for lab, _ in taken if (taken.get((lab, False)), taken.get((lab, True))) == quota})
    example = torch.full_like(docs, -1)
    kept = [(i, k, lab) for i, k, lab in parts if lab in classes]
    for e, (i, k, _) in enumerate(kept):
        example[i][pooled[i] & (docs[i] == k)] = e
    context = torch.tensor([i for i, _, _ in kept], dtype=torch.int64)
    return _Examples(classes, example, torch.tensor([classes.index(lab) for _, _, lab in kept], dtype=torch.int64),
                     context, test_ctx[context])


def _token_task(cls: torch.Tensor, pooled: torch.Tensor, test_ctx: torch.Tensor, quota: tuple[int, int]) -> _Examples:
    """Pooled tokens of letter class cls >= 0, per class the first quota[side] of each side (row-major order is
    stream order)."""
    n, T = cls.shape
    cls = torch.where(pooled, cls, -1).reshape(-1)
    side = test_ctx.repeat_interleave(T)
    names, chosen = [], []
    for c in range(len(LETTERS)):
        fit = ((cls == c) & ~side).nonzero().squeeze(1)[:quota[0]]
        test = ((cls == c) & side).nonzero().squeeze(1)[:quota[1]]
        if len(fit) == quota[0] and len(test) == quota[1]:
            names.append(LETTERS[c])
            chosen.append(torch.cat([fit, test]))
    flat = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
    example = torch.full((n * T,), -1, dtype=torch.int64)
    example[flat] = torch.arange(len(flat))
    label = torch.arange(len(chosen)).repeat_interleave(quota[0] + quota[1])
    return _Examples(names, example.reshape(n, T), label, flat // T, side[flat])


def _check_classes(probe: EvalSpec, name: str, ex: _Examples, what: str, where: str) -> None:
    if len(ex.classes) < 2:
        raise CscError(f"sparse probing, task {name!r} ({what}): {len(ex.classes)} class(es) "
                       f"({', '.join(ex.classes) or 'none'}) have eval.probe_examples_per_class = "
                       f"{probe.probe_examples_per_class} examples in {where}; a one-vs-rest task needs 2 classes: "
                       f"lower eval.probe_examples_per_class or give more held-out text")
