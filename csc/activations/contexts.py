"""Pack documents into fixed-length contexts: [BOS] + context_length-1 tokens of the document stream.

Documents are joined with the tokenizer's EOS (where it has one) and cut into consecutive windows,
as SAELens does. Context i of a split is always the same tokens, so shards are reproducible and a
single shard can be regenerated on its own.
"""

from __future__ import annotations

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

    def _fill(self, n: int) -> None:
        while len(self._contexts) < n and not self._exhausted:
            while len(self._buffer) < self._body:
                doc = next(self._docs, None)
                if doc is None:
                    self._exhausted = True
                    break
                self._buffer.extend(self._tok(doc, add_special_tokens=False)["input_ids"])
                if self._eos is not None:
                    self._buffer.append(self._eos)
            while len(self._buffer) >= self._body and len(self._contexts) < n:
                body, self._buffer = self._buffer[: self._body], self._buffer[self._body:]
                self._contexts.append(torch.tensor([self._bos, *body], dtype=torch.int64))

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
