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
