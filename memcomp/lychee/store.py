"""LycheeMemory's block store: an input of any length, cut into blocks of B tokens, each block compressed once by
a ``MemoryCompressor`` into B / C memory embeddings, persisted to disk and read back lazily (issue 12, deliverable
1; seeds 000 / 001: 4,096-token blocks at C = 4, question-independent, so encoded once and reused for every
question).

Building (``BlockStore.build``) streams: the source -- a ``str``, a file (a ``pathlib.Path``, or an open text
file), or an iterator of text pieces -- is read and tokenized a bounded window of characters at a time
(``token_windows``), blocks are encoded as soon as they are complete, and every ``shard_blocks`` blocks go to disk.
Host memory holds one tokenization window, one encoder call's embeddings (written to the shard file as they come)
and the token ids and text of one shard; device memory one encoder call (``max(1, chunks_per_batch // (B / C))``
blocks). Neither grows with the input's length (measured: ``memcomp.lychee.store_rss``, bench/bench_block_store.py).

On disk, in one directory::

    shard-00000.safetensors   embeddings [rows, d] (the compressor's dtype), token_ids [n] int32, text [bytes] uint8
    ...                       (the UTF-8 text of the shard's blocks), metadata: format, fingerprint, shard number
    progress.json             while a build runs: the shards finished so far and where to resume
    index.json                written last, atomically (temp + rename): the compressor fingerprint, chunk size,
                              hidden size, dtype, tokenizer digest, block size, source SHA-256; per shard its file,
                              blocks, byte size and SHA-256; per block its token span [start, end) in the token
                              stream, its source character and UTF-8 byte spans [start, end), its shard and rows

A directory without ``index.json`` never opens as a store, so an interrupted build never looks complete. Building
again into it with the same compressor, configuration and source resumes from the last finished shard: the
finished shards are neither re-encoded nor rewritten, and the result is identical to an uninterrupted build.

Token stream and exactness. A window is cut only at a point where splitting the text does not change its
tokenization: a candidate cut p (a change of character class -- whitespace, letter, digit, other -- latest
first) is accepted when the tokenizer gives ids(text[p-k:p+k]) == ids(text[p-k:p]) + ids(text[p:p+k]) for
k = 128 characters of context (fewer for tiny windows). This tests the tokenizer itself rather than assuming a
pre-tokenizer, so it holds for GPT-2-style byte-level BPE (a space attaches to the next word), Qwen2 / Llama-3
regexes (punctuation takes the newlines after it) and SentencePiece-style Metaspace tokenizers (a fresh start
adds a prefix space) alike; the tests prove that the streamed ids equal tokenizing the whole text at once for
each. Where it can differ: (1) a run of more than 8 windows of text with no accepted cut (e.g. megabytes of
base64 without a boundary the tokenizer keeps) is cut anyway; the tokens next to that cut may differ from a
one-shot tokenization by a merge, a ``UserWarning`` says where, and the index lists the character offsets in
``inexact_cuts``; (2) the split test sees k characters each side of the cut, so a single pre-token longer than
that which straddles the cut (a 200-character rule of "=" and the newlines after it is one Qwen2 pre-token) is
judged from its truncated ends. That is exact whenever no BPE merge joins the two sides, which is what the test
observes on those ends; it is not a proof. (Checked beyond the tests: SmolLM2's tokenizer on 1.7M characters of
Python source, windows of 256 to 65,536 characters, streamed ids equal to one-shot.)

Block texts partition the source: block i's characters run from its first token's start offset to the next
block's (the first block from 0, the last to the end), so ``"".join(store.text(i) for i in range(len(store)))``
is the source. A character split over two blocks' tokens (byte-level BPE splits multi-byte characters) belongs to
the later block.

Choices: empty input (no tokens) raises ``ValueError`` before anything is written; an input shorter than one block
is one partial block; ``block_tokens`` must be a multiple of the compressor's chunk size, so a chunk never
straddles two blocks and the blocks' memories concatenated are the memory of the whole text; encoding runs with
the compressor in eval mode (dropout off: the same text gives the same blocks on every build and resume), its
modules' modes restored afterwards. One build at a time per directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import warnings
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import safe_open

from memcomp.memory import Memory, MemoryFileError, MemoryMismatchError

if TYPE_CHECKING:
    from memcomp.compressor import MemoryCompressor

FORMAT = "memcomp-block-store"
SHARD_FORMAT = "memcomp-block-shard"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
_SHARD_NAME = "shard-{:05d}.safetensors"
# Files a build writes (and ``overwrite=True`` removes): shards, the two JSON files, and their temporaries.
_OWN_FILE = re.compile(r"^(shard-\d{5,}\.safetensors|index\.json|progress\.json)(\.tmp-\d+)?$")

_CUT_CONTEXT = 128  # characters each side of a candidate cut in the split test (module docstring)
_CUT_TRIES = 32  # candidate cuts tested per attempt before reading more text
_MAX_GROWTH = 8  # windows of text held, at most, while no cut is accepted; then a cut is forced
_TEXT_ERRORS = "surrogatepass"  # any Python str round-trips through UTF-8 bytes, lone surrogates included

Source = Union[str, "os.PathLike[str]", Iterable[str], io.TextIOBase]


# ------------------------------------------------------------------------------------------------------------
# Configuration and block records
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockStoreConfig:
    """How a source becomes blocks.

    block_tokens:  B, tokens per block (LycheeMemory: 4,096); a multiple of the compressor's chunk size C, so a
                   block is B / C memory embeddings (the last block of a source may be shorter).
    shard_blocks:  blocks per safetensors shard: the unit of resuming (an interrupted build loses at most one
                   shard's encoding). A shard's embeddings go to disk per encoder call; host memory holds its
                   token ids and text (4 bytes a token plus the UTF-8 text).
    window_chars:  characters tokenized per window while streaming (bounds host memory for tokenization; the
                   result does not depend on it, see the module docstring).
    """

    block_tokens: int = 4096
    shard_blocks: int = 64
    window_chars: int = 1 << 16

    def __post_init__(self) -> None:
        for name in ("block_tokens", "shard_blocks", "window_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockStoreConfig.{name} must be a positive int, got {v!r}")
        if self.window_chars < 64:
            raise ValueError(f"BlockStoreConfig.window_chars must be at least 64 (a cut needs characters of "
                             f"context on both sides), got {self.window_chars}")


@dataclass(frozen=True)
class Block:
    """Where block ``index`` sits: tokens [token_start, token_end) of the token stream, characters
    [char_start, char_end) and UTF-8 bytes [byte_start, byte_end) of the source, rows [row_start, row_end) of
    shard ``shard``'s embeddings (``ceil(num_tokens / C)`` rows)."""

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    byte_start: int
    byte_end: int
    shard: int
    row_start: int
    row_end: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def to_json(self) -> dict[str, Any]:
        return {"tokens": [self.token_start, self.token_end], "chars": [self.char_start, self.char_end],
                "bytes": [self.byte_start, self.byte_end], "shard": self.shard, "rows": [self.row_start, self.row_end]}

    @classmethod
    def from_json(cls, index: int, d: dict[str, Any]) -> Block:
        return cls(index, *d["tokens"], *d["chars"], *d["bytes"], d["shard"], *d["rows"])


# ------------------------------------------------------------------------------------------------------------
# Streaming tokenization
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenWindow:
    """One window of the token stream. ``text`` is source characters [char_start, char_start + len(text));
    ``ids`` its tokens (as ``tokenizer(text, add_special_tokens=False)``); ``starts`` each token's first
    character as an offset into the whole source; ``exact`` is False when the window ends at a forced cut
    (module docstring: the tokens next to it may differ from a one-shot tokenization)."""

    char_start: int
    text: str
    ids: list[int]
    starts: list[int]
    exact: bool = True


def token_windows(tokenizer: Any, source: Source, *, window_chars: int = 1 << 16,
                  encoding: str = "utf-8") -> Iterator[TokenWindow]:
    """Tokenize ``source`` (a str, a ``pathlib.Path`` or open text file, or an iterable of str pieces) a window
    of about ``window_chars`` characters at a time; the windows' ids concatenated are the ids of the whole text
    (see the module docstring for the exact conditions). ``tokenizer`` must be a fast (Rust) Hugging Face
    tokenizer: the character offsets come from it.

    Raises ``TypeError`` for a source of another type or a slow tokenizer, ``ValueError`` for a str that names an
    existing file (pass a ``pathlib.Path`` to read the file), ``FileNotFoundError`` for a missing file."""
    _check_tokenizer(tokenizer)
    BlockStoreConfig(window_chars=window_chars)  # validates window_chars
    return _windows(tokenizer, _source_pieces(source, window_chars, encoding), window_chars, 0)


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"the block store needs a fast (Rust-backed) Hugging Face tokenizer for character offsets, "
                        f"got {type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., "
                        "use_fast=True)")


def _source_pieces(source: Any, piece_chars: int, encoding: str) -> Iterator[str]:
    """Validate ``source`` now and return an iterator of its text in pieces of at most ``piece_chars``."""
    if isinstance(source, str):
        # A short one-line str that names an existing file was almost surely meant as the file.
        if len(source) <= 4096 and "\n" not in source and source.strip() and os.path.isfile(source):
            raise ValueError(f"source is a str naming an existing file ({source!r}); a str is encoded as text. Pass "
                             "pathlib.Path(...) to encode the file, or [text] to encode this text")
        return (source[i:i + piece_chars] for i in range(0, len(source), piece_chars))
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError("source is bytes; decode it to str first, or pass the file as a pathlib.Path")
    if isinstance(source, os.PathLike):
        path = os.fsdecode(os.fspath(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"source file not found: {path}")
        return _file_pieces(path, piece_chars, encoding)
    if callable(getattr(source, "read", None)):
        if isinstance(source, (io.RawIOBase, io.BufferedIOBase)) or "b" in str(getattr(source, "mode", "")):
            raise TypeError("source is a binary file; open it in text mode (open(path, encoding='utf-8', "
                            "newline='')) or pass the path as a pathlib.Path")
        return _reader_pieces(source, piece_chars)
    if isinstance(source, Iterable):
        return _iterable_pieces(source, piece_chars)
    raise TypeError(f"source must be a str (text), a pathlib.Path or open text file, or an iterable of str pieces; "
                    f"got {type(source).__name__}")


def _file_pieces(path: str, piece_chars: int, encoding: str) -> Iterator[str]:
    # newline="": no newline translation, so character offsets are offsets into the file's decoded text.
    with open(path, encoding=encoding, newline="") as f:
        try:
            yield from _reader_pieces(f, piece_chars)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not valid {encoding} text ({exc}); pass encoding=...") from exc


def _reader_pieces(f: Any, piece_chars: int) -> Iterator[str]:
    while True:
        piece = f.read(piece_chars)
        if not isinstance(piece, str):
            raise TypeError(f"source.read() returned {type(piece).__name__}, not str: open the file in text mode")
        if not piece:
            return
        yield piece


def _iterable_pieces(source: Iterable[Any], piece_chars: int) -> Iterator[str]:
    for k, piece in enumerate(source):
        if not isinstance(piece, str):
            raise TypeError(f"source piece {k} is a {type(piece).__name__}, not str (an iterable source yields "
                            "text pieces)")
        for i in range(0, len(piece), piece_chars):
            yield piece[i:i + piece_chars]


def _quiet_tokenizer_call(tokenizer: Any, text: str, offsets: bool) -> Any:
    from transformers.utils import logging as hf_logging

    # transformers warns once that a sequence exceeds the tokenizer's model_max_length ("will result in indexing
    # errors"); a window is never fed to the model whole (blocks are), so the warning would only mislead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets,
                         return_attention_mask=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(_quiet_tokenizer_call(tokenizer, text, False)["input_ids"]) if text else []


def _char_class(ch: str) -> int:
    if ch.isspace():
        return 0
    if ch.isalpha():
        return 1
    if ch.isnumeric():
        return 2
    return 3


def _cut_context(window_chars: int) -> int:
    return min(_CUT_CONTEXT, window_chars // 4)


def _is_safe_cut(tokenizer: Any, text: str, p: int, context: int) -> bool:
    """Whether splitting ``text`` at character ``p`` leaves the tokenization of the ``context`` characters on
    each side unchanged: ids(text[a:b]) == ids(text[a:p]) + ids(text[p:b])."""
    a, b = max(0, p - context), min(len(text), p + context)
    return _ids(tokenizer, text[a:b]) == _ids(tokenizer, text[a:p]) + _ids(tokenizer, text[p:b])


def _find_cut(tokenizer: Any, text: str, lo: int, hi: int, context: int) -> Optional[int]:
    """The latest safe cut in (lo, hi], among changes of character class; None after ``_CUT_TRIES`` failures."""
    tries = 0
    right = _char_class(text[hi])
    for p in range(hi, lo, -1):
        left = _char_class(text[p - 1])
        if left != right:
            if _is_safe_cut(tokenizer, text, p, context):
                return p
            tries += 1
            if tries >= _CUT_TRIES:
                return None
        right = left
    return None


def _tokenize_window(tokenizer: Any, text: str, char_start: int, exact: bool) -> TokenWindow:
    enc = _quiet_tokenizer_call(tokenizer, text, True)
    return TokenWindow(char_start, text, list(enc["input_ids"]), [char_start + s for s, _ in enc["offset_mapping"]],
                       exact)


def _windows(tokenizer: Any, pieces: Iterable[str], window_chars: int, char_start: int) -> Iterator[TokenWindow]:
    context = _cut_context(window_chars)
    buf, start = "", char_start
    for piece in pieces:
        buf += piece  # pieces are at most window_chars long: buf stays within (_MAX_GROWTH + 1) windows
        while len(buf) >= window_chars + context:
            hi = len(buf) - context  # the split test needs `context` characters after the cut
            cut = _find_cut(tokenizer, buf, window_chars // 2, hi, context)
            exact = cut is not None
            if cut is None:
                if len(buf) < _MAX_GROWTH * window_chars:
                    break  # read on: a safe cut may come with more text
                cut = hi
                warnings.warn(f"block store: no safe tokenization cut in {len(buf)} characters of text from "
                              f"character {start}; cutting at character {start + cut}, where the tokens may differ "
                              "from tokenizing the whole text at once (recorded in the index as inexact_cuts)",
                              stacklevel=2)
            yield _tokenize_window(tokenizer, buf[:cut], start, exact)
            buf, start = buf[cut:], start + cut
    if buf:
        yield _tokenize_window(tokenizer, buf, start, True)


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":  # directory handles cannot be fsynced elsewhere; the rename is still atomic
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise MemoryFileError(f"cannot read block store file {path}: it is truncated or corrupt ({exc})") from exc
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != FORMAT:
        raise MemoryFileError(f"{path} is not a memcomp block store file (format={fmt!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise MemoryFileError(f"{path}: block store format_version {data.get('format_version')!r}, this memcomp "
                              f"reads {FORMAT_VERSION}")
    return data


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for part in iter(lambda: f.read(1 << 20), b""):
            h.update(part)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """16 hex digits of SHA-256 over the tokenizer's vocabulary (added tokens included): the token ids a store
    holds mean nothing under another vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8", _TEXT_ERRORS)).hexdigest()[:16]


def _remove_own_files(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        os.remove(index)  # first: from here on the directory never looks like a complete store
    for name in os.listdir(directory):
        if _OWN_FILE.match(name):
            os.remove(os.path.join(directory, name))


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int32: "I32", torch.uint8: "U8"}
_SHARD_HEADER_BYTES = 4096  # reserved for the 8-byte length and the JSON header: tensor data starts 8-byte aligned


class _ShardWriter:
    """One shard, written as it fills, in the safetensors format: a little-endian u64 header length N, N bytes of
    JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``; trailing spaces allowed by the
    format), then the tensors' bytes back to back. ``safetensors.torch.save_file`` takes every tensor at once, which
    would hold a whole shard's embeddings in host memory (64 blocks of a 7B model at 4x: 470 MB in bf16); here each
    encoder call's embeddings go to disk as they come, and the header, known only at the end, is written into space
    reserved at the start. The file is a temporary until ``finish`` renames it. Files it writes are read by
    ``safetensors.safe_open`` / ``load_file`` (tested)."""

    def __init__(self, path: str) -> None:
        if sys.byteorder != "little":  # safetensors data is little-endian; raw tensor bytes are written as they are
            raise NotImplementedError("the block store writes shards on little-endian machines only")
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.file = open(self.tmp, "wb")
        self.file.seek(_SHARD_HEADER_BYTES)
        self.offset = 0
        self.rows = 0
        self.emb: Optional[tuple[torch.dtype, int]] = None
        self.entries: dict[str, dict[str, Any]] = {}

    def _write(self, t: torch.Tensor) -> int:
        if t.dtype not in _SAFETENSORS_DTYPE:
            raise TypeError(f"the block store cannot store {t.dtype} tensors (supported: "
                            f"{', '.join(str(d) for d in _SAFETENSORS_DTYPE)})")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(data)
        self.offset += data.nbytes
        return data.nbytes

    def append_embeddings(self, emb: torch.Tensor) -> range:
        """Append ``emb [n, d]`` to the ``embeddings`` tensor; returns its rows."""
        key = (emb.dtype, emb.shape[1])
        if self.emb is not None and self.emb != key:
            raise ValueError(f"block embeddings changed dtype or width within a shard: {self.emb} then {key}")
        self.emb = key
        self._write(emb)
        self.rows += emb.shape[0]
        return range(self.rows - emb.shape[0], self.rows)

    def add(self, name: str, t: torch.Tensor) -> None:
        """Add a whole tensor after the embeddings."""
        start = self.offset
        self._write(t)
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape),
                              "data_offsets": [start, self.offset]}

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header, flush to disk, rename into place."""
        dtype, width = self.emb
        emb_bytes = self.rows * width * torch.empty((), dtype=dtype).element_size()
        header = {"__metadata__": metadata,
                  "embeddings": {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": [self.rows, width],
                                 "data_offsets": [0, emb_bytes]}, **self.entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        n = _SHARD_HEADER_BYTES - 8
        if len(raw) > n:  # the metadata is a few short fields; this would be a bug, never silently a bad file
            raise RuntimeError(f"block store shard header of {len(raw)} bytes exceeds the {n} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", n) + raw + b" " * (n - len(raw)))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# ------------------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------------------


class _Builder:
    """The state of one build: pending tokens and text, the shard being filled, the finished shards and blocks."""

    def __init__(self, compressor: MemoryCompressor, config: BlockStoreConfig, header: dict[str, Any],
                 directory: str, resume: Optional[dict[str, Any]], overwrite: bool) -> None:
        self.comp, self.config, self.header, self.directory = compressor, config, header, directory
        self.B, self.C = config.block_tokens, header["chunk_size"]
        # Blocks per encoder call: about one micro-batch of chunks, so device memory is bounded by one call.
        self.group_blocks = max(1, compressor.config.chunks_per_batch // (self.B // self.C))
        self.overwrite = overwrite
        self.prepared = False
        self.hasher = hashlib.sha256()
        self.resume = resume
        if resume is not None:
            state = resume["state"]
            self.shards: list[dict[str, Any]] = list(resume["shards"])
            self.blocks: list[Block] = [Block.from_json(i, b) for i, b in enumerate(resume["blocks"])]
            self.inexact_cuts: list[int] = list(resume["inexact_cuts"])
            self.next_token, self.next_char, self.next_byte = state["token"], state["char"], state["byte"]
        else:
            self.shards, self.blocks, self.inexact_cuts = [], [], []
            self.next_token = self.next_char = self.next_byte = 0
        # Pending: tokens read but not yet in a block, with their start characters; text from pending_char0 on.
        self.pending_ids: list[int] = []
        self.pending_starts: list[int] = []
        self.pending_text = ""
        self.pending_char0 = 0
        # Window starts (char, stream token index, SHA-256 of the text before it) that pending tokens come from:
        # the first one is where a resume restarts tokenizing.
        self.marks: deque[tuple[int, int, str]] = deque()
        # Blocks waiting for the encoder (token ids, token / char / byte spans).
        self.group: list[tuple[list[int], int, int, int, int, int, int]] = []
        # The shard being filled: its file (embeddings written as they come), blocks, token ids and texts (UTF-8).
        self.shard: Optional[_ShardWriter] = None
        self.shard_blocks: list[Block] = []
        # int32 array: 4 bytes a token instead of ~36 for an int in a list (a shard holds 262K tokens at B = 4096;
        # as a list that was 9 MB of RSS growth up to the first full shard, measured with memcomp.lychee.store_rss).
        self.shard_ids = array("i")
        self.shard_text: list[bytes] = []

    # -- the stream ------------------------------------------------------------------------------------------

    def run(self, pieces: Iterator[str], bar: Any) -> None:
        char0, token0 = 0, 0
        if self.resume is not None:
            state = self.resume["state"]
            char0, token0 = state["resume_char"], state["resume_token"]
            pieces = self._skip(pieces, char0, state["resume_sha256"])
        self.bar = bar
        self.pending_char0 = char0  # the first window's text starts there
        skip = self.next_token - token0  # tokens of finished blocks at the start of the first window
        counter = token0
        end = char0
        for w in _windows(self.comp.tokenizer, pieces, self.config.window_chars, char0):
            self.marks.append((w.char_start, counter, self.hasher.hexdigest()))
            self.hasher.update(w.text.encode("utf-8", _TEXT_ERRORS))
            ids, starts = w.ids, w.starts
            if skip:
                d = min(skip, len(ids))
                ids, starts, skip = ids[d:], starts[d:], skip - d
            counter += len(w.ids)
            self.pending_ids.extend(ids)
            self.pending_starts.extend(starts)
            self.pending_text += w.text
            end = w.char_start + len(w.text)
            if not w.exact:
                self.inexact_cuts.append(end)
            while len(self.pending_ids) > self.B:  # the next block's first token is known: its start ends this one
                self._emit(self.B, None)
        # The interrupted build saw at least one token after its last finished shard (a shard is written only
        # once the next block's first token is known): the same source must have it too.
        if self.resume is not None and counter <= self.resume["state"]["token"]:
            raise ValueError(f"{self.directory} holds an interrupted build of another source (this one ends "
                             "where that build had more text); rerun with the same source to resume, or pass "
                             "overwrite=True")
        if self.pending_ids:
            self._emit(len(self.pending_ids), end)
        if self.next_token == 0:
            raise ValueError("the input is empty (it has no tokens); a block store needs at least one token")
        self._encode_group()
        if self.shard_blocks:
            self._write_shard()
        self._write_index(end)

    def _skip(self, pieces: Iterator[str], n_chars: int, digest: str) -> Iterator[str]:
        """Read past the first ``n_chars`` characters (hashing them), checking they are the interrupted build's."""
        seen = 0
        rest = ""
        for piece in pieces:
            take = min(len(piece), n_chars - seen)
            self.hasher.update(piece[:take].encode("utf-8", _TEXT_ERRORS))
            seen += take
            if seen == n_chars:
                rest = piece[take:]
                break
        if seen < n_chars or self.hasher.hexdigest() != digest:
            raise ValueError(f"{self.directory} holds an interrupted build of another source (its first {n_chars} "
                             "characters differ); rerun with the same source to resume, or pass overwrite=True")

        def chained() -> Iterator[str]:
            if rest:
                yield rest
            yield from pieces

        return chained()

    def _emit(self, n: int, end_char: Optional[int]) -> None:
        """Make the next block of the first ``n`` pending tokens; ``end_char`` is the source end for the last."""
        ids = self.pending_ids[:n]
        c0 = self.next_char
        c1 = end_char if end_char is not None else max(c0, self.pending_starts[n])
        text = self.pending_text[c0 - self.pending_char0:c1 - self.pending_char0]
        data = text.encode("utf-8", _TEXT_ERRORS)
        del self.pending_ids[:n], self.pending_starts[:n]
        self.pending_text = self.pending_text[c1 - self.pending_char0:]
        self.pending_char0 = c1
        t0, b0 = self.next_token, self.next_byte
        self.next_token, self.next_char, self.next_byte = t0 + n, c1, b0 + len(data)
        while len(self.marks) > 1 and self.marks[1][1] <= self.next_token:
            self.marks.popleft()
        self.group.append((ids, t0, t0 + n, c0, c1, b0, b0 + len(data)))
        self.shard_text.append(data)
        self.bar.update(len(data))
        if len(self.group) == self.group_blocks:
            self._encode_group()
        if len(self.shard_blocks) + len(self.group) == self.config.shard_blocks:
            self._encode_group()
            self._write_shard()

    def _encode_group(self) -> None:
        if not self.group:
            return
        mems = self.comp.encode([torch.tensor(g[0], dtype=torch.long) for g in self.group], progress=False)
        if self.shard is None:
            if not self.prepared:
                self._prepare_directory()
            self.shard = _ShardWriter(os.path.join(self.directory, _SHARD_NAME.format(len(self.shards))))
        for (ids, t0, t1, c0, c1, b0, b1), mem in zip(self.group, mems):
            if mem.fingerprint != self.header["fingerprint"]:
                raise MemoryMismatchError("the compressor's weights changed while the block store was being built "
                                          f"(fingerprint {self.header['fingerprint']} -> {mem.fingerprint})")
            rows = self.shard.append_embeddings(mem.embeddings)  # straight to disk: host memory holds one call
            block = Block(len(self.blocks) + len(self.shard_blocks), t0, t1, c0, c1, b0, b1, len(self.shards),
                          rows.start, rows.stop)
            self.shard_blocks.append(block)
            self.shard_ids.extend(ids)
        self.group = []

    def _prepare_directory(self) -> None:
        """Before the first write: remove what ``overwrite`` replaces and temporaries of killed builds."""
        os.makedirs(self.directory, exist_ok=True)
        if self.overwrite:
            _remove_own_files(self.directory)
        else:
            for name in os.listdir(self.directory):
                if _OWN_FILE.match(name) and ".tmp-" in name:
                    os.remove(os.path.join(self.directory, name))
        self.prepared = True

    def _write_shard(self) -> None:
        shard, self.shard = self.shard, None
        k = len(self.shards)
        first, last = self.shard_blocks[0], self.shard_blocks[-1]
        shard.add("token_ids", torch.frombuffer(self.shard_ids, dtype=torch.int32))
        shard.add("text", torch.frombuffer(bytearray(b"".join(self.shard_text)), dtype=torch.uint8)
                  if any(self.shard_text) else torch.empty(0, dtype=torch.uint8))
        shard.finish({"format": SHARD_FORMAT, "format_version": str(FORMAT_VERSION),
                      "fingerprint": self.header["fingerprint"], "shard": str(k), "first_block": str(first.index)})
        self.shards.append({"file": os.path.basename(shard.path), "blocks": [first.index, last.index + 1],
                            "tokens": [first.token_start, last.token_end], "bytes": [first.byte_start, last.byte_end],
                            "rows": shard.rows, "size": os.path.getsize(shard.path),
                            "sha256": _file_sha256(shard.path)})
        self.blocks.extend(self.shard_blocks)
        self.shard_blocks, self.shard_ids, self.shard_text = [], array("i"), []
        self._write_progress()

    def abort(self) -> None:
        """After a failure: drop the shard being written (its blocks are encoded again on resume)."""
        if self.shard is not None:
            self.shard.abort()
            self.shard = None

    def _write_progress(self) -> None:
        char, token, digest = self.marks[0]  # the window the next block's first token comes from
        state = {"token": self.next_token, "char": self.next_char, "byte": self.next_byte,
                 "resume_char": char, "resume_token": token, "resume_sha256": digest}
        _write_json_atomic(os.path.join(self.directory, PROGRESS_FILE), {
            **self.header, "state": state, "inexact_cuts": [c for c in self.inexact_cuts if c <= char],
            "shards": self.shards, "blocks": [b.to_json() for b in self.blocks]})

    def _write_index(self, end_char: int) -> None:
        _write_json_atomic(os.path.join(self.directory, INDEX_FILE), {
            **self.header, "num_blocks": len(self.blocks), "num_tokens": self.next_token, "num_chars": end_char,
            "num_bytes": self.next_byte, "source_sha256": self.hasher.hexdigest(), "inexact_cuts": self.inexact_cuts,
            "shards": self.shards, "blocks": [b.to_json() for b in self.blocks]})
        progress = os.path.join(self.directory, PROGRESS_FILE)
        if os.path.exists(progress):
            os.remove(progress)


# ------------------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------------------


_HEADER_KEYS = ("fingerprint", "chunk_size", "hidden_size", "dtype", "tokenizer_sha256", "block_tokens",
                "shard_blocks")


def _header(compressor: MemoryCompressor, config: BlockStoreConfig) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": compressor.fingerprint(),
            "chunk_size": compressor.config.chunk_size, "hidden_size": compressor.hidden_size,
            "dtype": str(compressor.dtype).removeprefix("torch."),
            "tokenizer_sha256": tokenizer_digest(compressor.tokenizer), "block_tokens": config.block_tokens,
            "shard_blocks": config.shard_blocks}


def _header_differences(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    return [f"{k}: {have.get(k)!r} on disk, {want[k]!r} asked" for k in _HEADER_KEYS if have.get(k) != want[k]]


class BlockStore:
    """A built block store, opened lazily: the index is read at open, a block's shard only when the block is.

    ``len(store)`` blocks; ``store[i]`` -> ``Memory`` (embeddings ``[ceil(n_i / C), d]`` in the compressor's
    dtype on ``device``, ``num_tokens = n_i`` (B for all blocks but possibly the last), ``chunk_size = C``, the
    compressor's fingerprint); iterating yields every block's ``Memory`` in order; ``store.text(i)`` -> the
    block's source text; ``store.token_ids(i)`` -> its tokens ``[n_i]`` int64; ``store.blocks[i]`` -> its
    ``Block`` (token, character and byte spans; for citations).

    Raises ``MemoryFileError`` (``memcomp.memory``) for a missing, truncated or corrupt index or shard, naming the
    file, and ``MemoryMismatchError`` when opened with a compressor other than the one that built it.
    """

    def __init__(self, directory: str, index: dict[str, Any], blocks: list[Block], device: torch.device) -> None:
        self.directory = directory
        self.index = index
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.device = device

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, compressor: MemoryCompressor, source: Source, directory: str | os.PathLike,
              config: Optional[BlockStoreConfig] = None, *, encoding: str = "utf-8", progress: Optional[bool] = None,
              overwrite: bool = False, device: str | torch.device = "cpu") -> BlockStore:
        """Encode ``source`` into a block store in ``directory`` and open it (on ``device``).

        Args:
            compressor: the ``MemoryCompressor`` whose encoder makes each block's memory (its chunk size C must
                divide ``config.block_tokens``; its tokenizer must be a fast one).
            source: a ``str`` (the text itself), a ``pathlib.Path`` (a file, read as ``encoding``; a str naming an
                existing file is refused as ambiguous), an open text file, or an iterable of str pieces.
            config: ``BlockStoreConfig`` (default: 4,096-token blocks, 64 blocks per shard).
            progress: a progress bar in source bytes: True / False; None = the compressor's
                ``config.progress``, and when that is None too, shown once a build has run for 2 s.
            overwrite: replace whatever store (complete or interrupted) ``directory`` holds. Without it: an
                interrupted build with the same compressor and configuration is resumed from its last finished
                shard; a complete store of the same source, compressor and configuration is opened as is (the
                source is read and hashed, not encoded); anything else raises.

        Raises:
            ValueError: empty input (nothing is written), a ``block_tokens`` that is not a multiple of C, an
                interrupted build of another source or configuration.
            MemoryMismatchError: ``directory`` holds an interrupted build by another compressor.
            MemoryFileError: ``directory`` holds an interrupted build with a missing or damaged finished shard, or a
                corrupt index.
            FileExistsError: ``directory`` holds a complete store that differs (source, compressor or configuration).
            TypeError: a source or config of another type, a slow tokenizer.
        """
        config = config if config is not None else BlockStoreConfig()
        if not isinstance(config, BlockStoreConfig):
            raise TypeError(f"config must be a BlockStoreConfig, got {type(config).__name__}")
        C = compressor.config.chunk_size
        if config.block_tokens % C:
            raise ValueError(f"block_tokens={config.block_tokens} is not a multiple of the compressor's chunk_size "
                             f"{C}: a block must hold whole chunks (block_tokens / chunk_size memory embeddings)")
        _check_tokenizer(compressor.tokenizer)
        pieces = _source_pieces(source, config.window_chars, encoding)
        directory = os.fspath(directory)
        header = _header(compressor, config)
        index_path, progress_path = os.path.join(directory, INDEX_FILE), os.path.join(directory, PROGRESS_FILE)
        resume = None
        if not overwrite and os.path.exists(index_path):
            existing = _read_json(index_path)
            diffs = _header_differences(header, existing)
            if not diffs:
                h = hashlib.sha256()
                for piece in pieces:
                    h.update(piece.encode("utf-8", _TEXT_ERRORS))
                if h.hexdigest() == existing.get("source_sha256"):
                    return cls.open(directory, compressor, device=device)
                diffs = ["the source text differs"]
            raise FileExistsError(f"{directory} holds a complete block store that differs from this build "
                                  f"({'; '.join(diffs)}); pass overwrite=True to replace it, or use another directory")
        if not overwrite and os.path.exists(progress_path):
            resume = _read_json(progress_path)
            if resume.get("fingerprint") != header["fingerprint"]:
                raise MemoryMismatchError(f"{directory} holds an interrupted build by another compressor (fingerprint "
                                          f"{resume.get('fingerprint')}, this compressor {header['fingerprint']}); "
                                          "pass overwrite=True to discard it, or use another directory")
            diffs = _header_differences(header, resume)
            if diffs:
                raise ValueError(f"{directory} holds an interrupted build with other settings ({'; '.join(diffs)}); "
                                 "rerun with the same ones to resume, or pass overwrite=True to discard it")
            for shard in resume["shards"]:
                path = os.path.join(directory, shard["file"])
                if not os.path.isfile(path) or os.path.getsize(path) != shard["size"]:
                    raise MemoryFileError(f"{directory} holds an interrupted build whose finished shard {path} is "
                                          "missing or damaged; pass overwrite=True to start over")
        show = progress if progress is not None else compressor.config.progress
        from tqdm.auto import tqdm

        total = None
        if isinstance(source, str):
            total = len(source.encode("utf-8", _TEXT_ERRORS))
        elif isinstance(source, os.PathLike) and encoding.lower().replace("-", "") == "utf8":
            total = os.path.getsize(source)
        builder = _Builder(compressor, config, header, directory, resume, overwrite)
        modes = [(m, m.training) for m in compressor.modules()]
        compressor.eval()
        bar = tqdm(total=total, initial=builder.next_byte, unit="B", unit_scale=True, desc="memcomp block store",
                   disable=show is False, delay=0 if show else 2.0)
        try:
            builder.run(pieces, bar)
        except BaseException:
            builder.abort()
            raise
        finally:
            bar.close()
            for m, training in modes:
                m.training = training
        return cls.open(directory, compressor, device=device)

    @classmethod
    def open(cls, directory: str | os.PathLike, compressor: Optional[MemoryCompressor] = None, *,
             device: str | torch.device = "cpu") -> BlockStore:
        """Open a built store: reads ``index.json`` and checks every shard's size (no shard is read). With
        ``compressor``, checks it is the one that built the store (``check_compressor``). Raises
        ``MemoryFileError`` for a missing, incomplete (interrupted build), corrupt or truncated store, naming the
        file; ``MemoryMismatchError`` for another compressor."""
        directory = os.fspath(directory)
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(index_path):
            progress_path = os.path.join(directory, PROGRESS_FILE)
            if os.path.isfile(progress_path):
                raise MemoryFileError(f"{directory} holds an incomplete block store: its build was interrupted; run "
                                      "BlockStore.build again with the same compressor and source to resume it")
            raise MemoryFileError(f"no block store in {directory} ({INDEX_FILE} not found)")
        index = _read_json(index_path)
        try:
            blocks = [Block.from_json(i, b) for i, b in enumerate(index["blocks"])]
            _check_layout(index, blocks)
        except MemoryFileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MemoryFileError(f"block store index {index_path} is corrupt ({type(exc).__name__}: {exc})") from exc
        store = cls(directory, index, blocks, torch.device(device))
        for k in range(len(index["shards"])):
            store._check_shard_size(k)
        if compressor is not None:
            store.check_compressor(compressor)
        return store

    def check_compressor(self, compressor: MemoryCompressor) -> None:
        """Raise ``MemoryMismatchError`` unless ``compressor`` built this store: its ``check_memory`` on the
        store's fingerprint, chunk size and hidden size, and the same tokenizer vocabulary."""
        probe = Memory(torch.empty(0, self.hidden_size), 0, self.chunk_size, self.fingerprint)
        compressor.check_memory(probe)
        if tokenizer_digest(compressor.tokenizer) != self.index["tokenizer_sha256"]:
            raise MemoryMismatchError(f"the block store in {self.directory} was tokenized with another vocabulary "
                                      "than this compressor's tokenizer")

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def chunk_size(self) -> int:
        return self.index["chunk_size"]

    @property
    def hidden_size(self) -> int:
        return self.index["hidden_size"]

    @property
    def block_tokens(self) -> int:
        return self.index["block_tokens"]

    @property
    def num_tokens(self) -> int:
        return self.index["num_tokens"]

    @property
    def source_sha256(self) -> str:
        """SHA-256 of the source text (UTF-8): tells whether a store was built from a given input."""
        return self.index["source_sha256"]

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (f"BlockStore({self.directory!r}, blocks={len(self)}, tokens={self.num_tokens}, "
                f"block_tokens={self.block_tokens}, chunk_size={self.chunk_size}, fingerprint={self.fingerprint})")

    # -- reading ---------------------------------------------------------------------------------------------

    def _block(self, i: Any) -> Block:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"block index must be an int, got {type(i).__name__}")
        n = len(self.blocks)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for a store of {n} blocks")
        return self.blocks[i]

    def _shard_path(self, k: int) -> str:
        return os.path.join(self.directory, self.index["shards"][k]["file"])

    def _check_shard_size(self, k: int) -> None:
        path, want = self._shard_path(k), self.index["shards"][k]["size"]
        try:
            have = os.path.getsize(path)
        except OSError as exc:
            raise MemoryFileError(f"block store shard {path} is missing ({exc})") from exc
        if have != want:
            raise MemoryFileError(f"block store shard {path} is {'truncated' if have < want else 'corrupt'}: "
                                  f"{have} bytes, the index records {want}")

    def _read(self, k: int, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` of shard ``k``, through a memory map of the shard."""
        self._check_shard_size(k)
        path = self._shard_path(k)
        try:
            f = safe_open(path, framework="pt", device="cpu")
            meta = f.metadata() or {}
            if (meta.get("format") != SHARD_FORMAT or meta.get("fingerprint") != self.fingerprint
                    or meta.get("shard") != str(k)):
                raise MemoryFileError(f"block store shard {path} does not belong to this store (metadata "
                                      f"format={meta.get('format')!r}, fingerprint={meta.get('fingerprint')!r}, "
                                      f"shard={meta.get('shard')!r})")
            return f.get_slice(name)[start:stop]
        except MemoryFileError:
            raise
        except Exception as exc:  # safetensors raises several types for truncated / corrupt headers
            raise MemoryFileError(f"cannot read block store shard {path}: it is truncated or corrupt ({exc})") from exc

    def __getitem__(self, i: int) -> Memory:
        b = self._block(i)
        emb = self._read(b.shard, "embeddings", b.row_start, b.row_end)
        return Memory(emb.to(self.device), b.num_tokens, self.chunk_size, self.fingerprint)

    def __iter__(self) -> Iterator[Memory]:
        for i in range(len(self)):
            yield self[i]

    def text(self, i: int) -> str:
        """Block ``i``'s source text (characters [char_start, char_end) of the source)."""
        b = self._block(i)
        base = self.index["shards"][b.shard]["bytes"][0]
        data = self._read(b.shard, "text", b.byte_start - base, b.byte_end - base)
        return data.numpy().tobytes().decode("utf-8", _TEXT_ERRORS)

    def token_ids(self, i: int) -> torch.Tensor:
        """Block ``i``'s tokens, ``[num_tokens]`` int64."""
        b = self._block(i)
        base = self.index["shards"][b.shard]["tokens"][0]
        return self._read(b.shard, "token_ids", b.token_start - base, b.token_end - base).to(torch.long)

    def verify(self) -> None:
        """Read every shard in full and check its SHA-256 against the index (opening checks sizes only). Raises
        ``MemoryFileError`` naming the first shard that differs."""
        for k, shard in enumerate(self.index["shards"]):
            self._check_shard_size(k)
            path = self._shard_path(k)
            if _file_sha256(path) != shard["sha256"]:
                raise MemoryFileError(f"block store shard {path} is corrupt: its SHA-256 differs from the index's")


def _check_layout(index: dict[str, Any], blocks: list[Block]) -> None:
    """The index describes contiguous blocks, each in its shard's rows, and shards that cover the blocks."""
    C, B = index["chunk_size"], index["block_tokens"]
    shards = index["shards"]
    t = c = y = 0
    for b in blocks:
        ok = (b.token_start == t and b.char_start == c and b.byte_start == y and 0 < b.num_tokens <= B
              and b.char_end >= b.char_start and b.byte_end >= b.byte_start and 0 <= b.shard < len(shards)
              and shards[b.shard]["blocks"][0] <= b.index < shards[b.shard]["blocks"][1]
              and b.row_end - b.row_start == math.ceil(b.num_tokens / C) and b.row_end <= shards[b.shard]["rows"])
        if not ok:
            raise MemoryFileError(f"block store index is corrupt: block {b.index} {b.to_json()} does not follow "
                                  f"the previous one or does not fit its shard")
        t, c, y = b.token_end, b.char_end, b.byte_end
    if not blocks or (t, c, y) != (index["num_tokens"], index["num_chars"], index["num_bytes"]):
        raise MemoryFileError(f"block store index is corrupt: its blocks cover {t} tokens, {c} characters and {y} "
                              f"bytes, its totals say {index['num_tokens']}, {index['num_chars']}, "
                              f"{index['num_bytes']}")
