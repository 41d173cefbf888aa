"""Pretraining data: tokenizer, corpus → cached token array → packed fixed-length examples.

    corpus        a text file, a folder of *.txt files (recursive), or the embedded default: the
                  docstrings of the Python standard library (read with ``ast``, nothing imported)
                  plus the pydoc topics, so a fresh machine pretrains with no download
    tokenizer     a HF tokenizer directory / tokenizer.json, a WordPiece vocab.txt (BERT
                  normalisation as its tokenizer_config.json says; by default lowercase, strip
                  accents), or a WordPiece vocab trained on the corpus (lowercase, strip accents)
    token cache   the whole corpus tokenized once into ``tokens-<hash>.bin`` (uint16 / uint32 ids,
                  read back as a numpy memmap); documents are separated by [SEP]; the hash covers
                  the corpus and the tokenizer
    examples      example i = [CLS] + stream[i·(T-2) : (i+1)·(T-2)] + [SEP], T tokens, attention mask
                  all ones; the short last example is padded with [PAD] (mask 0)

Every bad input raises :class:`FastElectraError` naming the path or argument.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import shutil
import sys
import sysconfig

import numpy as np

from .config import read_json_object

__all__ = ["FastElectraError", "SPECIAL_TOKENS", "Corpus", "resolve_corpus", "embedded_documents",
           "load_tokenizer", "train_tokenizer", "get_tokenizer", "special_token_ids", "save_tokenizer_files",
           "tokenize_corpus", "PackedExamples", "BatchSampler", "MicroBatches", "micro_batches"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EMBEDDED = "embedded"            # the corpus name of the default corpus
EMBEDDED_VERSION = 1             # bump when the way the embedded corpus is gathered changes
# stdlib folders that hold no library documentation (tests, the IDLE app, demos, vendored wheels)
EMBEDDED_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                      "dist-packages", "__pycache__"}
ENCODE_CHUNK = 2000              # documents per encode_batch call while tokenizing


class FastElectraError(ValueError):
    """A bad input (corpus, tokenizer, checkpoint, option) or a failed write; the message names it.
    The CLI prints it as ``error: ...`` and exits with status 2."""


# ----------------------------------------------------------------------------- corpus
def embedded_documents() -> list[str]:
    """The embedded default corpus: module/class/function docstrings of the standard library's
    Python sources, parsed with ``ast`` (no module is imported, so nothing runs), in sorted file
    order, followed by the pydoc topics (``pydoc_data.topics.topics``, a plain dict of strings)."""
    docs = []
    root = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EMBEDDED_SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        docs.append(doc)
    try:
        from pydoc_data.topics import topics
        docs += [inspect.cleandoc(topics[k]) for k in sorted(topics)]
    except ImportError:
        pass
    return docs


class Corpus:
    """Where the text comes from: ``files`` (sorted paths), or the embedded default when ``files`` is None."""

    def __init__(self, name: str, files: list[str] | None):
        self.name = name
        self.files = files

    def __repr__(self):
        return f"Corpus({self.name!r}, {len(self.files) if self.files is not None else 'embedded'} files)"

    def fingerprint(self) -> str:
        """A hash of the text: the content of every file (with its relative path), or for the embedded
        corpus the Python version and stdlib location it is gathered from."""
        h = hashlib.blake2b(digest_size=16)
        if self.files is None:
            h.update(f"embedded:{EMBEDDED_VERSION}:{sys.version}:{sysconfig.get_paths()['stdlib']}".encode())
            return h.hexdigest()
        for path in self.files:
            h.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
        return h.hexdigest()

    def documents(self):
        """Yield the documents: embedded docstrings, or each file's paragraphs (blocks between blank lines)."""
        if self.files is None:
            yield from embedded_documents()
            return
        for path in self.files:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = []
                    for line in f:
                        if line.strip():
                            lines.append(line.rstrip("\n"))
                        elif lines:
                            yield "\n".join(lines)
                            lines = []
                    if lines:
                        yield "\n".join(lines)
            except OSError as e:
                raise FastElectraError(f"cannot read corpus file {path}: {e.strerror or e}") from e


def resolve_corpus(path: str | None) -> Corpus:
    """A :class:`Corpus` for ``path``: None / ``"embedded"`` → the embedded default, a file, or a folder
    searched recursively for ``*.txt``. Raises FastElectraError for a missing path, a folder without
    text files, or a corpus with no text."""
    if path is None or path == EMBEDDED:
        return Corpus(EMBEDDED, None)
    if not os.path.exists(path):
        raise FastElectraError(f"corpus not found: {path}")
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise FastElectraError(f"corpus folder {path} contains no .txt files")
    else:
        files = [path]
    for f in files:
        if not os.access(f, os.R_OK):
            raise FastElectraError(f"corpus file {f} is not readable")
    if all(os.path.getsize(f) == 0 for f in files):
        raise FastElectraError(f"corpus {path} is empty")
    return Corpus(os.path.abspath(path), files)


# ----------------------------------------------------------------------------- tokenizer
def _bert_pipeline(tok, lowercase: bool = True, strip_accents: bool | None = True,
                   handle_chinese_chars: bool = True):
    """BERT-style normalisation, pre-tokenizer, [CLS]/[SEP] template, decoder. The normaliser's options are
    BertTokenizer's: ``lowercase`` (do_lower_case), ``strip_accents`` (None: strip when lowercasing) and
    ``handle_chinese_chars`` (tokenize_chinese_chars: a space around each CJK character); the defaults, which
    the trained tokenizer uses, lowercase and strip accents."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _vocab_txt_options(vocab_path: str) -> dict:
    """The BERT normaliser options for ``vocab_path`` from the tokenizer_config.json beside it, read as
    transformers' BertTokenizer reads them: do_lower_case (default true), strip_accents (default null: strip
    when lowercasing), tokenize_chinese_chars (default true). No tokenizer_config.json: those defaults."""
    path = os.path.join(os.path.dirname(os.path.abspath(vocab_path)), "tokenizer_config.json")
    if not os.path.isfile(path):
        return dict(lowercase=True, strip_accents=True, handle_chinese_chars=True)
    try:
        cfg = read_json_object(path, "tokenizer config")
    except OSError as e:
        raise FastElectraError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise FastElectraError(str(e)) from e
    for key, allowed, expected in (("do_lower_case", (True, False), "true or false"),
                                   ("strip_accents", (True, False, None), "true, false or null"),
                                   ("tokenize_chinese_chars", (True, False), "true or false")):
        if key in cfg and not any(cfg[key] is v for v in allowed):
            raise FastElectraError(f"{path}: {key} must be {expected}, got {cfg[key]!r}")
    lowercase = cfg.get("do_lower_case", True)
    strip_accents = cfg.get("strip_accents")
    return dict(lowercase=lowercase, strip_accents=lowercase if strip_accents is None else strip_accents,
                handle_chinese_chars=cfg.get("tokenize_chinese_chars", True))


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a HF tokenizer directory (tokenizer.json, else vocab.txt),
    a tokenizer.json file, or a WordPiece vocab.txt. A vocab.txt gets BERT normalisation with the
    do_lower_case / strip_accents / tokenize_chinese_chars of the tokenizer_config.json beside it, as
    transformers' BertTokenizer does (without one: lowercase, strip accents, split CJK characters)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    if not os.path.exists(path):
        raise FastElectraError(f"tokenizer not found: {path}")
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FastElectraError(f"tokenizer directory {path} has neither tokenizer.json nor vocab.txt")
    options = None if path.endswith(".json") else _vocab_txt_options(path)
    try:
        if path.endswith(".json"):
            tok = Tokenizer.from_file(path)
        else:
            tok = _bert_pipeline(Tokenizer(WordPiece.from_file(path, unk_token="[UNK]")), **options)
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
        raise FastElectraError(f"cannot read tokenizer {path}: {e}") from e
    if tok.get_vocab_size() == 0:
        raise FastElectraError(f"tokenizer {path} has an empty vocabulary")
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise FastElectraError(f"tokenizer {path} lacks the special tokens {missing} that ELECTRA needs")
    tok.no_truncation()
    tok.no_padding()
    return tok


def train_tokenizer(corpus: Corpus, vocab_size: int, min_frequency: int = 2):
    """Train a WordPiece vocab (BERT normalisation, special tokens [PAD] [UNK] [CLS] [SEP] [MASK]) on the corpus.

    tokenizers' trainer breaks frequency ties in hash-map order, so two trainings on one corpus may
    differ slightly (huggingface/tokenizers#1794); :func:`get_tokenizer` caches the result, and the
    token cache and checkpoints are keyed by the tokenizer's content, so a run and its resumption
    always use one vocab."""
    from tokenizers import Tokenizer, models, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise FastElectraError(f"vocab_size={vocab_size} is too small to train a tokenizer")
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(corpus.documents(), trainer=trainer)
    return _bert_pipeline(tok)  # again: the template needs the ids of [CLS]/[SEP], known only now


def get_tokenizer(path: str | None, corpus: Corpus, vocab_size: int, cache_dir: str, train: bool = True,
                  saved: dict | None = None):
    """(tokenizer, source): load ``path``, or (path None) the WordPiece vocab trained on ``corpus`` and
    cached in ``cache_dir/wordpiece-<hash>/``; with ``train=False`` a missing cache entry is an error
    (other ranks wait for rank 0 to train it). ``saved`` ({"folder": name, "json": tokenizer JSON}, as a
    checkpoint keeps it) refills a missing cache entry of that name instead of training anew, which
    would not reproduce the vocab exactly (see :func:`train_tokenizer`)."""
    if path is not None:
        return load_tokenizer(path), os.path.abspath(path)
    key = hashlib.blake2b(f"{corpus.fingerprint()}:{vocab_size}".encode(), digest_size=8).hexdigest()
    folder = os.path.join(cache_dir, f"wordpiece-{vocab_size}-{key}")
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        if not train:
            raise FastElectraError(f"trained tokenizer missing from the cache: {file}")
        if saved is not None and saved.get("folder") == os.path.basename(folder):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(saved["json"])
        else:
            tok = train_tokenizer(corpus, vocab_size)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = folder + f".tmp{os.getpid()}"
        save_tokenizer_files(tok, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return load_tokenizer(file), folder


def special_token_ids(tok) -> dict[str, int]:
    """The ids ElectraConfig needs: vocab_size and pad/unk/cls/sep/mask token ids."""
    return dict(vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"),
                unk_token_id=tok.token_to_id("[UNK]"), cls_token_id=tok.token_to_id("[CLS]"),
                sep_token_id=tok.token_to_id("[SEP]"), mask_token_id=tok.token_to_id("[MASK]"))


def save_tokenizer_files(tok, folder: str, model_max_length: int = 512) -> None:
    """Write tokenizer.json, vocab.txt (WordPiece only), tokenizer_config.json and special_tokens_map.json,
    so transformers' AutoTokenizer loads ``folder`` (an exported model directory)."""
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if type(tok.model).__name__ == "WordPiece":
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t, _ in vocab)
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**_hf_tokenizer_class(tok), "model_max_length": model_max_length, **specials}, f, indent=2)


def _hf_tokenizer_class(tok) -> dict:
    """tokenizer_config.json's class and options, so that transformers tokenizes as ``tok`` does: a BERT-style
    WordPiece tokenizer is an ElectraTokenizer with its normalizer's own options (transformers rebuilds the
    normalizer from do_lower_case & co, so a fixed do_lower_case=True would lowercase a cased vocabulary);
    any other (BPE, Unigram, other normalizers) is a PreTrainedTokenizerFast, which runs tokenizer.json as is."""
    spec = json.loads(tok.to_str())
    norm = spec.get("normalizer") or {}
    if spec.get("model", {}).get("type") == "WordPiece" and norm.get("type") == "BertNormalizer":
        return {"tokenizer_class": "ElectraTokenizer", "do_lower_case": bool(norm.get("lowercase", True)),
                "strip_accents": norm.get("strip_accents"),
                "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars", True))}
    return {"tokenizer_class": "PreTrainedTokenizerFast"}


def tokenizer_fingerprint(tok) -> str:
    return hashlib.blake2b(tok.to_str().encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------- token cache
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_corpus(corpus: Corpus, tok, cache_dir: str, build: bool = True) -> str:
    """Tokenize the corpus once into ``cache_dir/tokens-<hash>.bin`` (ids of the token dtype, documents
    separated by [SEP]); returns the path. The file is written under a temporary name and renamed, so
    a cache entry is always complete. With ``build=False`` a missing entry is an error."""
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    key = hashlib.blake2b(f"{corpus.fingerprint()}:{tokenizer_fingerprint(tok)}".encode(), digest_size=12).hexdigest()
    path = os.path.join(cache_dir, f"tokens-{key}.{np.dtype(dtype).name}.bin")
    if os.path.isfile(path):
        return path
    if not build:
        raise FastElectraError(f"token cache missing: {path}")
    os.makedirs(cache_dir, exist_ok=True)
    sep = tok.token_to_id("[SEP]")
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets (tokenizers >= 0.20)
    tmp = path + f".tmp{os.getpid()}"
    n_tokens = 0
    try:
        with open(tmp, "wb") as f:
            chunk = []

            def flush():
                nonlocal n_tokens
                ids = []
                for enc in encode(chunk, add_special_tokens=False):
                    if enc.ids:
                        ids.extend(enc.ids)
                        ids.append(sep)
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    raise FastElectraError(f"tokenizer produced ids outside [0, {vocab_size})")
                f.write(arr.astype(dtype).tobytes())
                n_tokens += arr.size
                chunk.clear()

            for doc in corpus.documents():
                chunk.append(doc)
                if len(chunk) == ENCODE_CHUNK:
                    flush()
            flush()
            f.flush()
            os.fsync(f.fileno())
        if n_tokens == 0:
            raise FastElectraError(f"corpus {corpus.name} is empty: it yields no tokens")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------- examples and batches
def _check_ints(*checks) -> None:
    """A FastElectraError naming the first value of ``checks`` (name, value, low) that is not an int (bools
    are not), else the first below its low (None: no bound)."""
    for name, value, _ in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise FastElectraError(f"{name} must be an int, got {value!r}")
    for name, value, low in checks:
        if low is not None and value < low:
            raise FastElectraError(f"{name} must be >= {low}, got {value}")


class PackedExamples:
    """Fixed-length examples packed from a token file: example i is
    ``[CLS] stream[i·(T-2) : (i+1)·(T-2)] [SEP]`` (T = seq_len), mask all ones; the short last one is
    padded with [PAD] (mask 0). ``ex[indices]`` returns a batch (input_ids int64 (B, T), attention_mask
    int64 (B, T)) as torch tensors, after checking every id is < vocab_size.

    The memmap is opened lazily, so the object pickles cheaply into DataLoader workers."""

    def __init__(self, token_file: str, seq_len: int, vocab_size: int, cls_id: int, sep_id: int, pad_id: int):
        _check_ints(("seq_len", seq_len, None), ("vocab_size", vocab_size, None), ("cls_id", cls_id, None),
                    ("sep_id", sep_id, None), ("pad_id", pad_id, None))
        if seq_len < 3:
            raise FastElectraError(f"seq_len={seq_len} is too short: an example needs [CLS], a token and [SEP]")
        self.token_file = token_file
        self.dtype = np.uint32 if token_file.endswith(".uint32.bin") else np.uint16
        self.n_tokens = os.path.getsize(token_file) // np.dtype(self.dtype).itemsize
        if self.n_tokens == 0:
            raise FastElectraError(f"token file {token_file} is empty")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.body = seq_len - 2
        self._tokens = None

    def __len__(self) -> int:
        return -(-self.n_tokens // self.body)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.token_file, dtype=self.dtype, mode="r")
        return self._tokens

    def __getitem__(self, indices):
        import torch

        raw = np.atleast_1d(np.asarray(indices))
        if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
            raise FastElectraError(f"indices must be a non-empty 1-D sequence of integer example indices, got "
                                   f"{raw.size} value(s) of dtype {raw.dtype} in {raw.ndim} dimension(s)")
        indices = raw.astype(np.int64)
        b, t, body = len(indices), self.seq_len, self.body
        ids = np.full((b, t), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, t), dtype=np.int64)
        ids[:, 0] = self.cls_id
        tokens = self.tokens
        for row, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"example index {i} out of range [0, {len(self)})")
            piece = tokens[i * body:(i + 1) * body]
            n = len(piece)
            ids[row, 1:n + 1] = piece
            ids[row, n + 1] = self.sep_id
            mask[row, :n + 2] = 1
        if ids.max() >= self.vocab_size:
            raise FastElectraError(f"token file {self.token_file} holds id {int(ids.max())} >= the model's "
                                   f"vocab_size {self.vocab_size}; was it made with another tokenizer?")
        return torch.from_numpy(ids), torch.from_numpy(mask)


class BatchSampler:
    """The example indices of every micro-batch this rank runs, from optimizer step ``start_step`` on.

    The global sample order is an endless sequence of seeded permutations of the examples (epoch e
    uses ``default_rng(seed + e)``); optimizer step s takes positions [s·B, (s+1)·B) of it (B the global
    batch). Those B examples are cut into world·accum micro-batches of B/(world·accum); micro-batch j
    belongs to rank j // accum, so ranks read disjoint shards and any (world, accum) split of one global
    batch sees the same examples. Yields (step, j, indices)."""

    def __init__(self, n_examples: int, global_batch: int, world: int, rank: int, accum: int, seed: int,
                 start_step: int, total_steps: int):
        _check_ints(("n_examples", n_examples, 1), ("global_batch", global_batch, 1), ("world", world, 1),
                    ("accum", accum, 1), ("seed", seed, 0), ("start_step", start_step, 0),
                    ("total_steps", total_steps, None), ("rank", rank, None))
        if not 0 <= rank < world:
            raise FastElectraError(f"rank must lie in [0, world={world}), got {rank}")
        if total_steps < start_step:
            raise FastElectraError(f"total_steps={total_steps} must be >= start_step={start_step}")
        if global_batch % (world * accum):
            raise FastElectraError(f"batch_size={global_batch} must be divisible by world size x grad_accum "
                                   f"= {world} x {accum}")
        self.n, self.batch, self.world, self.rank, self.accum = n_examples, global_batch, world, rank, accum
        self.micro = global_batch // (world * accum)
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._perms[epoch]

    def positions(self, start: int, count: int) -> np.ndarray:
        """Example indices at global sample positions [start, start + count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self.permutation(int(epoch))[pos[sel] % self.n]
        return out

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            for a in range(self.accum):
                j = self.rank * self.accum + a
                yield step, j, self.positions(step * self.batch + j * self.micro, self.micro)


class MicroBatches:
    """Map a sampler item (step, j, indices) to (step, j, input_ids, attention_mask); a DataLoader
    dataset (``batch_size=None``) or a plain in-process iterator."""

    def __init__(self, examples: PackedExamples):
        self.examples = examples

    def __getitem__(self, item):
        step, j, indices = item
        return (step, j, *self.examples[indices])


def micro_batches(examples: PackedExamples, sampler: BatchSampler, device, num_workers: int = 2):
    """An iterator over (step, j, input_ids, attention_mask): on CUDA a DataLoader with worker
    processes and pinned memory (so loading overlaps the GPU), on CPU a plain in-process loop."""
    dataset = MicroBatches(examples)
    if getattr(device, "type", str(device)) != "cuda" or num_workers == 0:
        return (dataset[item] for item in sampler)
    from torch.utils.data import DataLoader

    return iter(DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                           pin_memory=True, prefetch_factor=4, persistent_workers=False))
