"""fastelectra.data: corpus, tokenizer, token cache, packed examples, batch sampling."""
import json
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch

from fastelectra import data
from fastelectra.data import FastElectraError

WORDS = ("the cat sat on a mat while dogs ran over green hills and birds sang songs about rivers "
         "numbers lists tuples strings return values python module function class method").split()


def write_corpus(folder, n_lines=300, seed=0, name="corpus.txt"):
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        for i in range(n_lines):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + ".\n")
            if i % 10 == 9:
                f.write("\n")       # paragraph (document) break
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    corpus = data.resolve_corpus(corpus_file)
    tok, folder = data.get_tokenizer(None, corpus, 120, cache)
    return corpus, tok, folder, cache


# ----------------------------------------------------------------------------- corpus
def test_corpus_file_and_folder(tmp_path):
    a = write_corpus(str(tmp_path / "d" / "sub"), name="b.txt")
    b = write_corpus(str(tmp_path / "d"), name="a.txt", seed=1)
    (tmp_path / "d" / "notes.md").write_text("not text corpus")
    c = data.resolve_corpus(str(tmp_path / "d"))
    assert c.files == sorted([a, b])
    docs = list(c.documents())
    assert len(docs) == 60 and all(d.strip() for d in docs)       # 300 lines / 10 per paragraph, x2 files
    assert data.resolve_corpus(a).files == [a]


def test_corpus_errors_name_the_path(tmp_path):
    with pytest.raises(FastElectraError, match="corpus not found: .*nope"):
        data.resolve_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "x.json").write_text("{}")
    with pytest.raises(FastElectraError, match="contains no .txt files"):
        data.resolve_corpus(str(tmp_path / "empty_dir"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FastElectraError, match="empty.txt is empty"):
        data.resolve_corpus(str(tmp_path / "empty.txt"))
    # whitespace only: found when tokenizing
    (tmp_path / "blank.txt").write_text("\n \n\n")
    corpus = data.resolve_corpus(str(tmp_path / "blank.txt"))
    tok = data.train_tokenizer(data.resolve_corpus(write_corpus(str(tmp_path))), 100)
    with pytest.raises(FastElectraError, match="blank.txt is empty"):
        data.tokenize_corpus(corpus, tok, str(tmp_path / "cache"))


def test_corpus_fingerprint_follows_content(tmp_path):
    path = write_corpus(str(tmp_path))
    before = data.resolve_corpus(path).fingerprint()
    assert data.resolve_corpus(path).fingerprint() == before
    with open(path, "a") as f:
        f.write("one more line.\n")
    assert data.resolve_corpus(path).fingerprint() != before


def test_embedded_corpus_reads_stdlib_docs_without_importing(capsys):
    before = set(sys.modules)
    docs = data.embedded_documents()
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
    assert any("Return" in d for d in docs)
    new = set(sys.modules) - before
    assert not {"this", "antigravity", "turtle", "tkinter", "idlelib"} & new
    assert capsys.readouterr().out == ""
    assert data.resolve_corpus(None).files is None


# ----------------------------------------------------------------------------- tokenizer
def test_trained_tokenizer_is_bert_style(trained):
    _, tok, folder, _ = trained
    ids = data.special_token_ids(tok)
    assert [ids[k] for k in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id")] \
        == [0, 1, 2, 3, 4]
    assert 20 < ids["vocab_size"] <= 120
    assert tok.encode("The CÂT sat", add_special_tokens=False).ids == tok.encode("the cat sat",
                                                                                add_special_tokens=False).ids
    assert tok.encode("cat").tokens == ["[CLS]", "cat", "[SEP]"]
    assert os.path.isfile(os.path.join(folder, "tokenizer.json")) and os.path.isfile(os.path.join(folder, "vocab.txt"))


def test_trained_tokenizer_is_cached(trained):
    corpus, tok, folder, cache = trained
    stamp = os.path.getmtime(os.path.join(folder, "tokenizer.json"))
    tok2, folder2 = data.get_tokenizer(None, corpus, 120, cache, train=False)
    assert folder2 == folder and tok2.to_str() == tok.to_str()
    assert os.path.getmtime(os.path.join(folder, "tokenizer.json")) == stamp


def test_load_tokenizer_from_vocab_dir_and_json(trained, tmp_path):
    _, tok, folder, _ = trained
    from_json = data.load_tokenizer(os.path.join(folder, "tokenizer.json"))
    from_dir = data.load_tokenizer(folder)
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    (vocab_only / "vocab.txt").write_text(open(os.path.join(folder, "vocab.txt")).read())
    from_vocab = data.load_tokenizer(str(vocab_only / "vocab.txt"))
    text = "The Cat sat on the MAT, over the hills."
    want = tok.encode(text, add_special_tokens=False).ids
    for t in (from_json, from_dir, from_vocab, data.load_tokenizer(str(vocab_only))):
        assert t.encode(text, add_special_tokens=False).ids == want
        assert t.get_vocab_size() == tok.get_vocab_size()


def test_load_tokenizer_errors(tmp_path, trained):
    with pytest.raises(FastElectraError, match="tokenizer not found: .*missing"):
        data.load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FastElectraError, match="neither tokenizer.json nor vocab.txt"):
        data.load_tokenizer(str(tmp_path / "nothing"))
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(FastElectraError, match="cannot read tokenizer .*tokenizer.json"):
        data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(FastElectraError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        data.load_tokenizer(str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("options", [None, {}, {"do_lower_case": False},
                                     {"do_lower_case": False, "strip_accents": True},
                                     {"do_lower_case": True, "strip_accents": False}, {"tokenize_chinese_chars": False},
                                     {"do_lower_case": False, "strip_accents": None, "tokenize_chinese_chars": False}])
def test_vocab_txt_follows_its_tokenizer_config_like_transformers(options, tmp_path):
    """A HF checkpoint folder often ships vocab.txt + tokenizer_config.json and no tokenizer.json: its
    do_lower_case / strip_accents / tokenize_chinese_chars decide the ids (a cased model was lowercased)."""
    transformers = pytest.importorskip("transformers")
    vocab = data.SPECIAL_TOKENS + ["Paris", "paris", "Café", "café", "cafe", "Cafe", "中", "国", "中国", "is",
                                   "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if options is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ElectraTokenizer", **options}))
    hf = transformers.ElectraTokenizer.from_pretrained(str(tmp_path))
    for path in (tmp_path, tmp_path / "vocab.txt"):
        tok = data.load_tokenizer(str(path))
        for text in ("Paris is Café 中国 .", "PARIS cafe 中 国"):
            assert tok.encode(text).ids == hf(text)["input_ids"], (path, text)


def test_bad_tokenizer_config_beside_vocab_txt_is_a_clear_error(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(data.SPECIAL_TOKENS + ["hello"]) + "\n")
    for text, message in [("{ not json", r"tokenizer_config.json is not valid JSON"),
                          ("[1, 2]", r"tokenizer_config.json must hold a JSON object"),
                          ('{"do_lower_case": "no"}', r"tokenizer_config.json: do_lower_case must be true or false, "
                                                      r"got 'no'"),
                          ('{"strip_accents": 1}', r"strip_accents must be true, false or null, got 1")]:
        (tmp_path / "tokenizer_config.json").write_text(text)
        with pytest.raises(FastElectraError, match=message):
            data.load_tokenizer(str(tmp_path))


def test_exported_tokenizer_files_load_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, tok, _, _ = trained
    data.save_tokenizer_files(tok, str(tmp_path / "export"), model_max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    text = "The cat sat on the mat."
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.mask_token_id == 4 and hf.pad_token_id == 0 and hf.model_max_length == 128


@pytest.mark.parametrize("kind", ["cased WordPiece", "BPE"])
def test_exported_tokenizer_files_keep_a_given_tokenizers_behaviour(kind, tmp_path):
    """A --tokenizer that is cased or not WordPiece: transformers must give the ids the model was trained on
    (a fixed do_lower_case=True made it lowercase and strip accents: other ids, silently)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    texts = ["The Cat sat on a MAT.", "Café naïve résumé, Python's module", "birds SANG songs about rivers"] * 40
    if kind == "BPE":
        t = Tokenizer(models.BPE(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=data.SPECIAL_TOKENS)
    else:
        t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        t.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=data.SPECIAL_TOKENS)
    t.train_from_iterator(texts, trainer)
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(x, t.token_to_id(x)) for x in ("[CLS]", "[SEP]")])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    data.save_tokenizer_files(tok, str(tmp_path / "export"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    for text in texts[:3]:
        assert hf(text)["input_ids"] == tok.encode(text).ids, text


# ----------------------------------------------------------------------------- token cache and examples
def test_token_cache_written_once_and_keyed(trained, tmp_path):
    corpus, tok, _, _ = trained
    cache = str(tmp_path / "cache")
    path = data.tokenize_corpus(corpus, tok, cache)
    assert path.endswith(".uint16.bin") and os.listdir(cache) == [os.path.basename(path)]
    stamp = os.path.getmtime(path)
    assert data.tokenize_corpus(corpus, tok, cache, build=False) == path
    assert os.path.getmtime(path) == stamp
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    assert tokens.max() < tok.get_vocab_size()
    sep = tok.token_to_id("[SEP]")
    assert (tokens == sep).sum() == len(list(corpus.documents()))          # one [SEP] after each document
    expected = tok.encode(next(corpus.documents()), add_special_tokens=False).ids
    assert tokens[:len(expected)].tolist() == expected
    other = data.train_tokenizer(corpus, 60)
    assert data.tokenize_corpus(corpus, other, cache) != path             # another tokenizer, another entry


def test_packed_examples_layout(tmp_path):
    stream = np.arange(5, 5 + 23, dtype=np.uint16)       # 23 tokens, ids 5..27
    path = str(tmp_path / "tokens-x.uint16.bin")
    stream.tofile(path)
    ex = data.PackedExamples(path, seq_len=10, vocab_size=30, cls_id=2, sep_id=3, pad_id=0)
    assert len(ex) == 3                                    # 8 + 8 + 7 tokens
    ids, mask = ex[[0, 1, 2]]
    assert ids.dtype == torch.int64 and ids.shape == (3, 10) and mask.shape == (3, 10)
    assert ids[:, 0].tolist() == [2, 2, 2]
    assert ids[0].tolist() == [2, *range(5, 13), 3] and mask[0].tolist() == [1] * 10
    assert ids[2].tolist() == [2, *range(21, 28), 3, 0] and mask[2].tolist() == [1] * 9 + [0]
    body = torch.cat([ids[i, 1:int(mask[i].sum()) - 1] for i in range(3)])
    assert body.tolist() == stream.tolist()
    with pytest.raises(IndexError):
        ex[[3]]
    small = data.PackedExamples(path, seq_len=10, vocab_size=20, cls_id=2, sep_id=3, pad_id=0)
    with pytest.raises(FastElectraError, match="holds id 27 >= the model's vocab_size 20"):
        small[[2]]
    for bad in ([], [0.7], [[0, 1]]):
        with pytest.raises(FastElectraError, match="indices must be a non-empty 1-D sequence of integer"):
            ex[bad]
    with pytest.raises(FastElectraError, match="seq_len must be an int, got 10.0"):
        data.PackedExamples(path, seq_len=10.0, vocab_size=30, cls_id=2, sep_id=3, pad_id=0)
    import pickle

    assert pickle.loads(pickle.dumps(ex))[[1]][0].tolist() == ex[[1]][0].tolist()   # reopens the memmap


# ----------------------------------------------------------------------------- batch sampler
def collect(n, batch, world, accum, seed=0, start=0, total=7):
    out = {}
    for rank in range(world):
        for step, j, idx in data.BatchSampler(n, batch, world, rank, accum, seed, start, total):
            assert j // accum == rank and len(idx) == batch // (world * accum)
            out[(step, j)] = idx.tolist()
    return out


def test_batch_sampler_splits_one_global_batch():
    single = collect(50, 12, 1, 1)
    for world, accum in ((1, 2), (2, 1), (2, 3), (3, 2), (4, 1)):
        split = collect(50, 12, world, accum)
        for step in range(7):
            parts = [split[(step, j)] for j in range(world * accum)]
            assert sum(parts, []) == single[(step, 0)]                   # same examples, same order
            if step * 12 // 50 == ((step + 1) * 12 - 1) // 50:              # within one epoch:
                flat = sum(parts, [])
                assert len(set(flat)) == len(flat)                       # ranks' shards are disjoint


def test_batch_sampler_epochs_and_resume():
    full = collect(10, 4, 1, 1, total=10)                # 40 samples = 4 epochs of 10
    order = sum((full[(s, 0)] for s in range(10)), [])
    for e in range(4):
        assert sorted(order[10 * e:10 * (e + 1)]) == list(range(10))
    assert order[:10] != order[10:20]                    # reshuffled every epoch
    resumed = collect(10, 4, 1, 1, start=6, total=10)
    assert resumed == {k: v for k, v in full.items() if k[0] >= 6}
    big = collect(3, 8, 1, 1, total=2)                   # a batch larger than the data set
    assert sorted(big[(0, 0)][:3]) == [0, 1, 2] and len(big[(1, 0)]) == 8
    with pytest.raises(FastElectraError, match="batch_size=10 must be divisible by world size x grad_accum"):
        data.BatchSampler(50, 10, 2, 0, 3, 0, 0, 5)


@pytest.mark.parametrize("args, message", [
    ((10, 8, 0, 0, 1, 0, 0, 1), "world must be >= 1, got 0"),
    ((10, 8, 1, 0, 0, 0, 0, 1), "accum must be >= 1, got 0"),
    ((10, 4, 2, 5, 1, 0, 0, 1), r"rank must lie in \[0, world=2\), got 5"),
    ((10, 4, 2, -1, 1, 0, 0, 1), r"rank must lie in \[0, world=2\), got -1"),
    ((10, 4, 1, 0, 1, -1, 0, 1), "seed must be >= 0, got -1"),
    ((0, 4, 1, 0, 1, 0, 0, 1), "n_examples must be >= 1, got 0"),
    ((10, 4, 1, 0, 1, 0, 5, 1), "total_steps=1 must be >= start_step=5"),
    ((10, 4.0, 1, 0, 1, 0, 0, 1), "global_batch must be an int, got 4.0"),
])
def test_batch_sampler_rejects_bad_arguments(args, message):
    with pytest.raises(FastElectraError, match=message):
        data.BatchSampler(*args)


def test_micro_batches_on_cpu_is_a_plain_iterator(tmp_path):
    path = str(tmp_path / "t.uint16.bin")
    np.arange(5, 105, dtype=np.uint16).tofile(path)
    ex = data.PackedExamples(path, 12, 200, 2, 3, 0)
    sampler = data.BatchSampler(len(ex), 4, 1, 0, 2, 0, 0, 3)
    batches = list(data.micro_batches(ex, sampler, torch.device("cpu")))
    assert [(s, j) for s, j, _, _ in batches] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(ids.shape == (2, 12) and mask.shape == (2, 12) for _, _, ids, mask in batches)
    # the DataLoader path (workers + pinned memory, used on CUDA) yields the same batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # no accelerator here to pin memory for
        loader = list(data.micro_batches(ex, sampler, torch.device("cuda"), num_workers=1))
    assert len(loader) == len(batches)
    for (s, j, ids, mask), (s2, j2, ids2, mask2) in zip(batches, loader):
        assert (s, j) == (s2, j2) and torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert len(sampler) == 6
