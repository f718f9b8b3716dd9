"""Pack documents into fixed-length contexts: [BOS] + context_length-1 tokens of the document stream.

Documents are joined with the tokenizer's EOS (where it has one) and cut into consecutive windows,
as SAELens does. Context i of a split is always the same tokens, so shards are reproducible and a
single shard can be regenerated on its own. Body token j of context i is token i * (context_length - 1) + j
of the joined stream, so which document a token comes from follows from the documents' lengths alone.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import torch

from csc.errors import InputError


class ContextStream:
    """Lazily tokenises documents and hands out contexts by index, as an int64 tensor [n, context_length]."""

    def __init__(self, docs: Iterator[str], tokenizer, bos_id: int, context_length: int, what: str):
        self._docs = docs
        self._tok = tokenizer
        self._bos = bos_id
        self._eos = tokenizer.eos_token_id
        self._body = context_length - 1
        self._what = what
        self._buffer: list[int] = []
        self._contexts: list[torch.Tensor] = []
        self._exhausted = False
        self._pushed = 0  # tokens joined into the stream so far, EOS joiners included
        self._doc_start, self._doc_end = array("q"), array("q")  # stream span of each document's own tokens

    def _fill(self, n: int) -> None:
        while len(self._contexts) < n and not self._exhausted:
            while len(self._buffer) < self._body:
                doc = next(self._docs, None)
                if doc is None:
                    self._exhausted = True
                    break
                ids = self._tok(doc, add_special_tokens=False)["input_ids"]
                self._buffer.extend(ids)
                self._doc_start.append(self._pushed)
                self._pushed += len(ids)
                self._doc_end.append(self._pushed)
                if self._eos is not None:
                    self._buffer.append(self._eos)
                    self._pushed += 1
            # Cut from an offset and drop the used tokens once: re-slicing the rest of the buffer for every context
            # made this quadratic in a document's length (seconds for the embedded corpus's held-out plays).
            used = 0
            while len(self._buffer) - used >= self._body and len(self._contexts) < n:
                body = self._buffer[used: used + self._body]
                used += self._body
                self._contexts.append(torch.tensor([self._bos, *body], dtype=torch.int64))
            del self._buffer[:used]

    def available(self, n: int) -> int:
        """How many of the first n contexts exist (fewer when the corpus runs out)."""
        self._fill(n)
        return min(n, len(self._contexts))

    def get(self, start: int, stop: int) -> torch.Tensor:
        self._fill(stop)
        if stop > len(self._contexts):
            raise InputError(f"{self._what}: the corpus holds only {len(self._contexts)} contexts of "
                             f"{self._body + 1} tokens, {stop} are needed; lower the token count or add text")
        return torch.stack(self._contexts[start:stop])

    def documents_of(self, start: int, stop: int) -> torch.Tensor:
        """[n, context_length] int64: the index (in the split's reading order) of the document each token of
        contexts start..stop-1 comes from; -1 at BOS and at the EOS that joins two documents."""
        n = self.get(start, stop).shape[0]
        pos = torch.arange(start * self._body, stop * self._body).reshape(n, self._body)
        starts = torch.tensor(self._doc_start, dtype=torch.int64)
        ends = torch.tensor(self._doc_end, dtype=torch.int64)
        doc = torch.searchsorted(starts, pos, right=True) - 1  # the last document that starts at or before pos
        inside = pos < ends[doc.clamp(min=0)]
        return torch.cat([torch.full((n, 1), -1), torch.where(inside, doc, -1)], dim=1)
