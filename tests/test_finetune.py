"""Fine-tuning end to end on a small labelled data set built here: a keyword decides the label.

A tiny random-init ELECTRA (fastelectra and HF checkpoints) learns it on CPU in a few seconds; the best
model loads in transformers, `predict` labels a file, the CLI runs both, and bad inputs are clear errors."""
import csv
import json
import random

import pytest
import torch

from fastelectra.cli import main
from fastelectra.config import ElectraConfig
from fastelectra.data import FastElectraError
from fastelectra.finetune import finetune, layerwise_param_groups, read_examples
from fastelectra.model import ElectraDiscriminator, ElectraForSequenceClassification
from fastelectra.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = ["the", "a", "movie", "film", "story", "plot", "actor", "scene", "was", "is", "very", "quite", "and",
          "but", "it", "this", "really", "so", "of", "in"]
KEYWORDS = {"pos": ["good", "great", "excellent"], "neg": ["bad", "awful", "boring"],
            "mid": ["okay", "fine", "average"]}
VOCAB = SPECIALS + FILLER + [w for ws in KEYWORDS.values() for w in ws]
FAST = dict(epochs=8, batch_size=16, lr=2e-3, layer_decay=0.9, warmup=0.1, patience=3, max_seq_length=24,
            device="cpu", log=None)


def sentences(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(KEYWORDS)[i % 3]
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path, rows, columns=None):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def tiny_config(**kw):
    return ElectraConfig(**{**dict(vocab_size=len(VOCAB), embedding_size=64, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                                   backend="eager"), **kw})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    ours = d / "ours"
    ElectraDiscriminator(tiny_config()).save_pretrained(str(ours))
    (ours / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return {"dir": d, "ours": str(ours), "train": write_csv(d / "train.csv", sentences(240, 0)),
            "dev": write_csv(d / "dev.csv", sentences(60, 1)), "test": write_jsonl(d / "test.jsonl", sentences(30, 2))}


def test_finetune_fastelectra_checkpoint_end_to_end(work, tmp_path):
    out = tmp_path / "clf"
    s = finetune(work["ours"], work["train"], str(out), work["dev"], **FAST)
    dev = s["dev"]
    assert dev["accuracy"] > 0.8                                         # chance is 1/3
    assert set(dev) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix", "labels"}
    assert dev["labels"] == ["mid", "neg", "pos"]
    cm = dev["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == 60 and sum(cm[i][i] for i in range(3)) == round(dev["accuracy"] * 60)
    assert 1 <= s["best_epoch"] <= FAST["epochs"] and len(s["history"]) >= s["best_epoch"]
    assert json.loads((out / "finetune_metrics.json").read_text())["best_epoch"] == s["best_epoch"]

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "mid", "1": "neg", "2": "pos"}
    assert config["label2id"] == {"mid": 0, "neg": 1, "pos": 2}
    assert config["unpad"] is True             # padded batches, backend auto: the encoder skipped the padding
    assert (out / "tokenizer.json").exists() and (out / "vocab.txt").exists()

    transformers = pytest.importorskip("transformers")
    hf = transformers.ElectraForSequenceClassification.from_pretrained(str(out), attn_implementation="eager").eval()
    assert hf.config.id2label == {0: "mid", 1: "neg", 2: "pos"}
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    batch = tok(["the film was great", "a boring plot and it was so very bad"], padding=True, return_tensors="pt")
    ours = ElectraForSequenceClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
        torch.testing.assert_close(ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), ref,
                                   atol=1e-5, rtol=1e-5)
    assert [hf.config.id2label[i] for i in ref.argmax(-1).tolist()] == ["pos", "neg"]

    # a classifier for the same labels keeps its head when fine-tuned again: good from the first epoch
    again = finetune(str(out), work["train"], str(tmp_path / "again"), work["dev"], **{**FAST, "epochs": 1, "lr": 1e-6})
    assert again["dev"]["accuracy"] == pytest.approx(dev["accuracy"], abs=0.05)

    r = predict(str(out), work["test"], str(tmp_path / "pred.jsonl"), device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == r["n"] == 30
    assert all(row["predicted_label"] in ("mid", "neg", "pos") and 0 < row["score"] <= 1 for row in rows)
    assert r["metrics"]["accuracy"] == pytest.approx(sum(x["predicted_label"] == x["label"] for x in rows) / 30)
    assert r["metrics"]["accuracy"] > 0.7


def test_finetune_hf_checkpoint_with_text_pairs_and_held_out_dev(work, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_dir = tmp_path / "hf"
    cfg = transformers.ElectraConfig(vocab_size=len(VOCAB), embedding_size=48, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=40)
    transformers.ElectraModel(cfg).save_pretrained(str(hf_dir))          # a bare encoder: keys without "electra."
    rows = [{"text": " ".join(random.Random(i).choices(FILLER, k=4)), "text_pair": r["text"], "label": r["label"]}
            for i, r in enumerate(sentences(300, 3))]
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "clf"
    s = finetune(str(hf_dir), train, str(out), tokenizer=str(work["dir"] / "vocab.txt"),
                 **{**FAST, "max_seq_length": 40, "metric": "f1", "patience": 8, "epochs": 12})   # it plateaus first
    assert s["dev"]["n"] == 30 and s["dev"]["f1"] > 0.7
    hf = transformers.ElectraForSequenceClassification.from_pretrained(str(out))
    assert hf.config.label2id == {"mid": 0, "neg": 1, "pos": 2}
    saved = json.loads((out / "config.json").read_text())          # the special ids of the tokenizer saved with it
    assert [saved[f"{t}_token_id"] for t in ("pad", "unk", "cls", "sep", "mask")] == [0, 1, 2, 3, 4]


def test_cli_finetune_and_predict(work, tmp_path, capsys):
    out = tmp_path / "clf"
    argv = ["finetune", "--model", work["ours"], "--train", work["train"], "--dev", work["dev"], "--out", str(out),
            "--epochs", "8", "--batch-size", "16", "--lr", "2e-3", "--layer-decay", "0.9", "--max-seq-length", "24",
            "--device", "cpu", "--backend", "eager"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epoch 1:" in text and "confusion matrix" in text and "saved to" in text
    unlabelled = write_csv(tmp_path / "in.csv", [{"id": i, "text": r["text"]} for i, r in enumerate(sentences(12, 5))])
    assert main(["predict", "--model", str(out), "--input", unlabelled, "--output", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["id", "text", "predicted_label", "score"]
    assert "wrote 12 predictions" in capsys.readouterr().out


def test_layerwise_learning_rates():
    model = ElectraForSequenceClassification(tiny_config(num_hidden_layers=3, embedding_size=16))
    groups = layerwise_param_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.01)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named)
    assert lr_of[id(named["classifier.out_proj.weight"])] == (1.0, 0.01)
    # google-research/electra's _get_layer_lrs: lr·decay^(L + 2 - depth), embeddings at depth 0, layer l at
    # l + 1, the head at L + 2
    assert lr_of[id(named["electra.encoder.layer.2.attention.self.query.weight"])] == (0.25, 0.01)  # top: decay^2
    assert lr_of[id(named["electra.encoder.layer.0.output.dense.weight"])] == (0.0625, 0.01)        # decay^4
    assert lr_of[id(named["electra.encoder.layer.0.output.LayerNorm.weight"])] == (0.0625, 0.0)
    assert lr_of[id(named["electra.embeddings.word_embeddings.weight"])] == (0.03125, 0.01)         # decay^(L+2)
    assert lr_of[id(named["electra.embeddings_project.bias"])] == (0.03125, 0.0)


def test_seed_is_checked_first_with_pretrains_range(tmp_path, capsys):
    for seed in (-1, 2**32, 0.5):
        with pytest.raises(FastElectraError, match=r"--seed must be an integer in \[0, 2\*\*32 - 1"):
            finetune(str(tmp_path / "nowhere"), str(tmp_path / "missing.csv"), str(tmp_path / "o"), seed=seed)
    code = main(["finetune", "--model", str(tmp_path / "nowhere"), "--train", str(tmp_path / "missing.csv"),
                 "--out", str(tmp_path / "o"), "--seed", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --seed must be") and "Traceback" not in err


def test_bad_inputs_are_clear_errors(work, tmp_path, capsys):
    d = tmp_path
    rows = sentences(20, 7)

    def run(train, dev=None, model=work["ours"], **kw):
        return finetune(model, train, str(d / "o"), dev, **{**FAST, **kw})

    with pytest.raises(FastElectraError, match=r"dev file .*dev_new.csv has labels never seen in train .*\['meh'\]"):
        run(work["train"], write_csv(d / "dev_new.csv", rows + [{"text": "so so", "label": "meh"}]))
    with pytest.raises(FastElectraError, match="has no label column 'label'"):
        run(write_csv(d / "nolabel.csv", [{"text": r["text"]} for r in rows]))
    with pytest.raises(FastElectraError, match=r"row 3: no value in column 'label'"):
        run(write_csv(d / "blank.csv", rows[:2] + [{"text": "x", "label": ""}] + rows[3:]))
    with pytest.raises(FastElectraError, match="has no text column 'text'"):
        run(write_csv(d / "notext.csv", [{"sentence": r["text"], "label": r["label"]} for r in rows]))
    with pytest.raises(FastElectraError, match="has no text column 'review'"):
        run(work["train"], text_column="review")
    with pytest.raises(FastElectraError, match="row 2: no value in column 'text'"):
        run(write_jsonl(d / "gap.jsonl", [rows[0], {"label": "pos"}] + rows[2:]))
    with pytest.raises(FastElectraError, match="has a 'text_pair' column but .*train.csv does not"):
        run(work["train"], write_csv(d / "pairs.csv", [{**r, "text_pair": "x"} for r in rows]))
    for name, text, message in [                                     # train files written as they are
            ("empty.csv", "", "train file .*empty.csv is empty"),
            ("header.csv", "text,label\n", "header.csv has no rows"),
            ("bad.jsonl", '{"text": "a", "label": "pos"}\nnot json\n', "bad.jsonl, line 2: not valid JSON"),
            ("comma.csv", "text,label\nfine,pos\nthe film, was great,pos\n",  # an unquoted comma
             "comma.csv, line 3: 3 fields but the header has 2"),
            ("short.tsv", "text\tlabel\nfine\tpos\nno label here\n",
             "short.tsv, line 3: 1 fields but the header has 2")]:
        (d / name).write_text(text)
        with pytest.raises(FastElectraError, match=message):
            run(str(d / name))
    with pytest.raises(FastElectraError, match="train file not found"):
        run(str(d / "missing.csv"))
    with pytest.raises(FastElectraError, match="single label"):
        run(write_csv(d / "one.csv", [{"text": "a", "label": "pos"}] * 4))
    with pytest.raises(FastElectraError, match="--max-seq-length must be an integer >= 3"):
        predict(work["ours"], work["test"], str(d / "p.csv"), max_seq_length=1)

    other = d / "other"                                              # vocabulary of another size
    ElectraDiscriminator(tiny_config(vocab_size=len(VOCAB) + 7)).save_pretrained(str(other))
    with pytest.raises(FastElectraError, match=rf"has vocab_size={len(VOCAB) + 7} but the tokenizer .*vocab.txt has "
                                               rf"{len(VOCAB)} tokens"):
        run(work["train"], model=str(other), tokenizer=str(work["dir"] / "vocab.txt"))
    with pytest.raises(FastElectraError, match="no tokenizer files"):
        run(work["train"], model=str(other))
    with pytest.raises(FastElectraError, match="checkpoint not found"):
        run(work["train"], model=str(d / "nowhere"))
    with pytest.raises(FastElectraError, match="not a sequence classifier"):
        predict(work["ours"], work["test"], str(d / "p.csv"))
    with pytest.raises(FastElectraError, match="unknown file type .txt"):
        read_examples(str(work["dir"] / "vocab.txt"))

    code = main(["finetune", "--model", work["ours"], "--train", str(d / "empty.csv"), "--out", str(d / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: train file") and "Traceback" not in err


def test_new_head_loading(work):
    with pytest.raises(ValueError, match="does not match ElectraForSequenceClassification"):
        ElectraForSequenceClassification.from_pretrained(work["ours"])               # strict by default
    clf = ElectraForSequenceClassification.from_pretrained(work["ours"], new_head=True, num_labels=5)
    disc = ElectraDiscriminator.from_pretrained(work["ours"])
    assert clf.classifier.out_proj.out_features == 5
    for k, v in disc.state_dict().items():
        if k.startswith("electra."):
            torch.testing.assert_close(clf.state_dict()[k], v, rtol=0, atol=0)


def test_held_out_split_keeps_every_label_in_train_and_reads_excel_csv(tmp_path):
    """Without --dev, each label gives about dev_fraction of its rows to dev but never its last one (a rare
    label that landed only in dev used to crash); a CSV with a byte-order mark (Excel's) reads."""
    from fastelectra.finetune import stratified_split

    labels = ["a"] * 5 + ["b"] * 4 + ["c"] + ["d"] * 30
    for seed in range(20):
        train, dev = stratified_split(labels, 0.1, seed)
        assert sorted(train + dev) == list(range(len(labels)))
        assert {labels[i] for i in train} == {"a", "b", "c", "d"}
        assert [labels[i] for i in dev] == ["d"] * 3     # 10% of 30; a, b: round(0.5) = round(0.4) = 0
    assert stratified_split(["a", "b", "b"], 0.1, 0)[1] != []                 # at least one dev row
    with pytest.raises(FastElectraError, match="no label with 2 rows"):
        stratified_split(["a", "b"], 0.5, 0)
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nfine,pos\n".encode("utf-8"))
    assert read_examples(str(path)).texts == ["fine"]


def save_classifier(folder, **config):
    """A random-init classifier folder with the test vocabulary: for predict's behaviour, not its accuracy."""
    torch.manual_seed(0)
    labels = ["mid", "neg", "pos"]
    cfg = tiny_config(num_labels=3, extra={"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in
                                                                                              enumerate(labels)}})
    ElectraForSequenceClassification(cfg.with_overrides(**config)).save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(folder)


@pytest.mark.parametrize("problem_type, num_labels", [("regression", 1), (None, 1), ("multi_label_classification", 4)])
def test_predict_regression_and_multi_label_classifiers_like_transformers(work, tmp_path, problem_type, num_labels):
    """A regression head's output is its raw value and a multi-label head's is a sigmoid per label, never a
    softmax over one class (always LABEL_0 with score 1.0) or over independent labels."""
    transformers = pytest.importorskip("transformers")
    names = {i: "abcd"[i] for i in range(num_labels)}
    cfg = transformers.ElectraConfig(vocab_size=len(VOCAB), embedding_size=32, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     id2label=names, problem_type=problem_type, initializer_range=0.5)
    torch.manual_seed(0)
    hf = transformers.ElectraForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    rows = [{"id": i, **r} for i, r in enumerate(sentences(24, 4))]
    tok = transformers.ElectraTokenizer.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        logits = hf(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"out{suffix}"
        r = predict(str(tmp_path / "hf"), write_csv(tmp_path / "in.csv", rows), str(out), device="cpu")
        assert "metrics" not in r and r["problem_type"] == (problem_type or "regression")
        if suffix == ".csv":
            with open(out) as f:
                got = list(csv.DictReader(f))
            columns = list(got[0])
            got = [{k: json.loads(v) if k in ("predicted_label", "score") else v for k, v in x.items()} for x in got]
        else:
            got = [json.loads(line) for line in out.read_text().splitlines()]
            columns = list(got[0])
        assert [x["id"] for x in got] == [str(r["id"]) for r in rows]                     # input order
        if num_labels == 1:
            assert columns == ["id", "text", "label", "predicted_label"]                   # the value; no score
            assert [x["predicted_label"] for x in got] == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
        else:
            assert columns == ["id", "text", "label", "predicted_label", "score"]
            probs = logits.sigmoid()
            want = [[i for i in range(num_labels) if p[i] > 0.5] for p in probs]
            assert len({len(w) for w in want}) > 1                                  # 0, 1, 2... labels a row
            assert [x["predicted_label"] for x in got] == [[names[i] for i in w] for w in want]
            for x, p, w in zip(got, probs, want):
                assert x["score"] == pytest.approx(p[w].tolist(), abs=1e-5)


def test_predict_rejects_an_unknown_problem_type(work, tmp_path):
    folder = save_classifier(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    for problem_type, num_labels, message in [("ranking", 3, "problem_type must be .*got 'ranking'"),
                                              ("single_label_classification", 1, "needs num_labels >= 2")]:
        (tmp_path / "clf" / "config.json").write_text(json.dumps({**config, "problem_type": problem_type,
                                                                  "num_labels": num_labels, "id2label": None}))
        with pytest.raises(FastElectraError, match=message):
            predict(folder, work["test"], str(tmp_path / "p.csv"), device="cpu")


@pytest.mark.parametrize("problem_type, labels", [("regression", None),
                                                  ("multi_label_classification", ["mid", "neg", "pos"])])
def test_finetune_exports_a_single_label_classifier_whatever_the_checkpoints_task(work, tmp_path, problem_type,
                                                                                   labels):
    """Fine-tuning trains a softmax head: the exported config must not keep the checkpoint's problem_type,
    which made transformers train the export with MSELoss (regression) or BCE (multi-label)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ElectraConfig(vocab_size=len(VOCAB), embedding_size=64, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                                     problem_type=problem_type, **({"num_labels": 1} if labels is None else
                                                                   {"id2label": dict(enumerate(labels))}))
    torch.manual_seed(0)
    transformers.ElectraForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    finetune(str(tmp_path / "hf"), work["train"], str(tmp_path / "out"), work["dev"], **{**FAST, "epochs": 1})
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_labels"] == 3 and saved.get("problem_type") in (None, "single_label_classification")
    assert saved["id2label"] == {"0": "mid", "1": "neg", "2": "pos"}
    hf = transformers.ElectraForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    y = torch.tensor([1, 2])
    out = hf(input_ids=torch.tensor([[2, 10, 11, 3], [2, 12, 5, 3]]), labels=y)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))


def test_documented_learning_rates_are_the_codes(capsys):
    """The module docstring and --lr's help state google-research/electra's rule, which the code follows
    (test_layerwise_learning_rates): the top layer gets lr·decay^2, not lr."""
    import fastelectra.finetune

    doc = " ".join(fastelectra.finetune.__doc__.split())
    assert "layer l (0 = bottom) of L lr·decay^(L+1-l), embeddings (and the E→H projection) lr·decay^(L+2)" in doc
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--lr LR peak learning rate of the classification head; encoder layer l (0 = bottom) of L gets "
            "lr·layer_decay^(L+1-l), the embeddings lr·layer_decay^(L+2)") in text and "top layer" not in text


def test_predict_output_columns_never_overwrite_input_columns(work, tmp_path, capsys):
    folder = save_classifier(tmp_path / "clf")
    rows = [{"id": i, "text": r["text"], "score": f"human rating {i}"} for i, r in enumerate(sentences(6, 6))]
    scored = write_csv(tmp_path / "scored.csv", rows)
    with pytest.raises(FastElectraError, match=r"--score-column 'score' is already a column of .*scored.csv; choose "
                                               r"another name"):
        predict(folder, scored, str(tmp_path / "p.csv"), device="cpu")
    with pytest.raises(FastElectraError, match=r"--output-column 'text' is already a column of .*scored.csv"):
        predict(folder, scored, str(tmp_path / "p.csv"), device="cpu", output_column="text", score_column="s")
    with pytest.raises(FastElectraError, match=r"--output-column and --score-column are both 'p'"):
        predict(folder, work["test"], str(tmp_path / "p.csv"), device="cpu", output_column="p", score_column="p")
    assert not (tmp_path / "p.csv").exists()

    predict(folder, scored, str(tmp_path / "p.csv"), device="cpu", score_column="model_score")
    with open(tmp_path / "p.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["id", "text", "score", "predicted_label", "model_score"]
    assert [x["score"] for x in got] == [r["score"] for r in rows]                  # the user's column is kept
    assert all(x["predicted_label"] in ("mid", "neg", "pos") and 0 < float(x["model_score"]) <= 1 for x in got)

    base = ["predict", "--model", folder, "--input", scored, "--output", str(tmp_path / "cli.csv"), "--device", "cpu"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --score-column 'score' is already a column") and "Traceback" not in err
    assert main(base + ["--score-column", "model_score"]) == 0


def test_pair_column_with_a_single_segment_checkpoint_is_a_clear_error(work, tmp_path, capsys):
    """type_vocab_size=1 has no embedding for the second segment: a text_pair column is a FastElectraError
    (the model's ValueError escaped the CLI as a traceback)."""
    folder = save_classifier(tmp_path / "clf", type_vocab_size=1)
    pairs = write_csv(tmp_path / "pairs.csv", [{**r, "text_pair": "the plot"} for r in sentences(12, 8)])
    message = (r"pairs.csv has a pair column 'text_pair' but checkpoint .*clf has type_vocab_size=1 \(one segment\); "
               r"remove the column or set --pair-column to one the file lacks")
    with pytest.raises(FastElectraError, match=message):
        predict(folder, pairs, str(tmp_path / "p.csv"), device="cpu")
    with pytest.raises(FastElectraError, match=message):
        finetune(folder, pairs, str(tmp_path / "o"), **FAST)
    assert predict(folder, pairs, str(tmp_path / "p.csv"), device="cpu", pair_column="none")["n"] == 12
    for argv in (["predict", "--model", folder, "--input", pairs, "--output", str(tmp_path / "p.csv")],
                 ["finetune", "--model", folder, "--train", pairs, "--out", str(tmp_path / "o")]):
        assert main(argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "type_vocab_size=1" in err and "Traceback" not in err


def test_predict_says_what_is_wrong_with_the_checkpoint(work, tmp_path):
    """Only missing classifier weights make a checkpoint "not a sequence classifier"; a corrupt weights file and
    a bad config.json are reported as what they are."""
    corrupt = save_classifier(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x01\x00")
    badact = save_classifier(tmp_path / "badact")
    config = json.loads((tmp_path / "badact" / "config.json").read_text())
    (tmp_path / "badact" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_fast"}))
    for folder, message in [(corrupt, r"cannot read weights file .*model.safetensors \(corrupt or truncated\?\)"),
                            (badact, r"config.json is not a usable ELECTRA config: .*hidden_act='gelu_fast'")]:
        with pytest.raises(FastElectraError, match=message) as e:
            predict(folder, work["test"], str(tmp_path / "p.csv"), device="cpu")
        assert "not a sequence classifier" not in str(e.value)
    with pytest.raises(FastElectraError, match=r"ours is not a sequence classifier \(it has no classifier weights"):
        predict(work["ours"], work["test"], str(tmp_path / "p.csv"), device="cpu")
