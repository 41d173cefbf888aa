"""Fine-tuning for sequence classification, as the ELECTRA paper fine-tunes (Clark et al. 2020, App. A).

    data         a CSV/TSV or JSON-lines file with a text column, an optional text_pair column and a
                 label column; labels are strings (JSON numbers are written as strings); the label
                 order is sorted, or the checkpoint's when it is already a single-label classifier for
                 the same labels
    model        fastelectra.model.ElectraForSequenceClassification loaded from a fastelectra or HF
                 checkpoint directory (a pretraining run's folder works: its discriminator/ is used);
                 the encoder is loaded, a new classification head is initialised (the checkpoint's own
                 head is kept when it is already a single-label classifier for the same labels); the
                 saved config.json carries the new labels, never the checkpoint's problem_type
    batches      dynamic padding to the longest sequence of the batch; unless the backend is eager the
                 encoder then runs on the real tokens only (ElectraConfig.unpad, varlen attention),
                 else the attention mask goes to the masked attention
    optimizer    AdamW with google-research/electra's layer-wise learning-rate decay: head lr, layer l
                 (0 = bottom) of L lr·decay^(L+1-l), embeddings (and the E→H projection) lr·decay^(L+2);
                 no weight decay on biases and LayerNorm weights; linear warmup then linear decay to 0;
                 grad clip 1.0
    selection    the dev metric (accuracy or macro F1) after each epoch; the best model is saved to
                 ``out`` in HF format with the tokenizer files and id2label/label2id in config.json;
                 training stops after ``patience`` epochs without improvement
    metrics      accuracy, macro precision / recall / F1 and the confusion matrix (scikit-learn),
                 written to ``out/finetune_metrics.json``

``fastelectra finetune`` runs :func:`finetune`; ``fastelectra predict`` (fastelectra/predict.py) labels a file.
Every bad input raises FastElectraError naming the file, column, label or checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import backend as _backend
from .config import ElectraConfig
from .data import FastElectraError, load_tokenizer, save_tokenizer_files, special_token_ids
from .model import ElectraForSequenceClassification
from .pretrain import check_seed, clip_and_step, decays, lr_lambda

__all__ = ["Examples", "read_examples", "read_config", "load_classifier_tokenizer", "resolve_checkpoint",
           "check_pair_column", "layerwise_param_groups", "make_batches", "evaluate", "finetune", "add_cli_arguments",
           "run_cli"]

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
METRICS_FILE = "finetune_metrics.json"


# ----------------------------------------------------------------------------- data files
@dataclass
class Examples:
    """Rows of a data file: ``texts``, ``pairs`` (None without a pair column), ``labels`` (None without
    a label column), and the rows themselves with their column order (for writing predictions)."""

    path: str
    rows: list[dict]
    columns: list[str]
    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None

    def __len__(self) -> int:
        return len(self.rows)


def _file_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in CSV_SUFFIXES:
        return suffix[1:]
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise FastElectraError(f"{path}: unknown file type {suffix or '(none)'}; expected .csv, .tsv or .jsonl")


def _read_rows(path: str, role: str) -> tuple[list[dict], list[str]]:
    if not os.path.isfile(path):
        raise FastElectraError(f"{role} file not found: {path}")
    fmt = _file_format(path)
    if os.path.getsize(path) == 0:
        raise FastElectraError(f"{role} file {path} is empty")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:     # -sig: a byte-order mark (Excel) is dropped
            if fmt in ("csv", "tsv"):
                reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
                rows = []
                for row in reader:      # a row with more or fewer fields than the header is an error, not a shift
                    if None in row or None in row.values():      # extra fields go under None; missing are None
                        n = (len(reader.fieldnames) + len(row[None]) if None in row
                             else sum(v is not None for v in row.values()))
                        raise FastElectraError(f"{role} file {path}, line {reader.line_num}: {n} fields but the "
                                               f"header has {len(reader.fieldnames)} (quote fields that contain "
                                               f"{'a comma' if fmt == 'csv' else 'a tab'})")
                    rows.append(row)
                columns = list(reader.fieldnames or [])
            else:
                rows, columns = [], []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FastElectraError(f"{role} file {path}, line {i}: not valid JSON ({e.msg})") from e
                    if not isinstance(row, dict):
                        raise FastElectraError(f"{role} file {path}, line {i}: expected a JSON object per line")
                    rows.append(row)
                    columns += [k for k in row if k not in columns]
    except (OSError, UnicodeDecodeError) as e:
        raise FastElectraError(f"cannot read {role} file {path}: {e}") from e
    if not rows:
        raise FastElectraError(f"{role} file {path} has no rows")
    return rows, columns


def read_examples(path: str, *, role: str = "data", text_column: str = "text", pair_column: str = "text_pair",
                  label_column: str = "label", require_labels: bool = True) -> Examples:
    """Read a CSV/TSV (header row) or JSON-lines file. ``role`` (train, dev, input) names the file in errors."""
    rows, columns = _read_rows(path, role)
    if text_column not in columns:
        raise FastElectraError(f"{role} file {path} has no text column {text_column!r} (columns: {columns}); "
                               "set it with --text-column")
    if require_labels and label_column not in columns:
        raise FastElectraError(f"{role} file {path} has no label column {label_column!r} (columns: {columns}); "
                               "set it with --label-column")

    def cell(row, column, i, required, allow_blank=False):
        # required: a missing value (and, unless allow_blank, a blank one) is an error naming the row
        v = row.get(column)
        if v is None or (not allow_blank and isinstance(v, str) and not v.strip()):
            if required:
                raise FastElectraError(f"{role} file {path}, row {i}: no value in column {column!r}")
            return ""
        return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)

    texts = [cell(r, text_column, i, True, allow_blank=True) for i, r in enumerate(rows, 1)]
    pairs = [cell(r, pair_column, i, False) for i, r in enumerate(rows, 1)] if pair_column in columns else None
    labels = None
    if label_column in columns:
        if require_labels or all(r.get(label_column) not in (None, "") for r in rows):
            labels = [cell(r, label_column, i, True).strip() for i, r in enumerate(rows, 1)]
    return Examples(path, rows, columns, texts, pairs, labels)


# ----------------------------------------------------------------------------- checkpoint and tokenizer
def resolve_checkpoint(path: str) -> str:
    """The model directory in ``path``: ``path`` itself (config.json) or a pretraining run's ``discriminator/``."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "discriminator", "config.json")):
        return os.path.join(path, "discriminator")
    if not os.path.exists(path):
        raise FastElectraError(f"checkpoint not found: {path}")
    raise FastElectraError(f"checkpoint {path} has no config.json (nor discriminator/config.json)")


def read_config(model_dir: str) -> ElectraConfig:
    try:
        return ElectraConfig.from_json_file(os.path.join(model_dir, "config.json"))
    except (ValueError, TypeError) as e:       # not JSON, not an ELECTRA config, bad values
        raise FastElectraError(f"checkpoint {model_dir}: config.json is not a usable ELECTRA config: {e}") from e


def load_classifier_tokenizer(model_dir: str, tokenizer: str | None, config: ElectraConfig):
    """(tokenizer, where it came from): ``tokenizer`` or the one saved with the checkpoint (its folder or
    the pretraining run folder above it); its vocabulary must be the checkpoint's."""
    if tokenizer is None:
        for d in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
            if any(os.path.isfile(os.path.join(d, n)) for n in ("tokenizer.json", "vocab.txt")):
                tokenizer = d
                break
        else:
            raise FastElectraError(f"checkpoint {model_dir} has no tokenizer files (tokenizer.json or vocab.txt); "
                                   "pass one with --tokenizer")
    tok = load_tokenizer(tokenizer)
    if tok.get_vocab_size() != config.vocab_size:
        raise FastElectraError(f"checkpoint {model_dir} has vocab_size={config.vocab_size} but the tokenizer "
                               f"{tokenizer} has {tok.get_vocab_size()} tokens; use the tokenizer the checkpoint "
                               "was trained with")
    if tok.token_to_id("[PAD]") != config.pad_token_id:
        raise FastElectraError(f"checkpoint {model_dir} has pad_token_id={config.pad_token_id} but the tokenizer "
                               f"{tokenizer} has [PAD] = {tok.token_to_id('[PAD]')}; they do not belong together")
    return tok, tokenizer


def check_pair_column(examples: Examples, config: ElectraConfig, model_dir: str, pair_column: str) -> None:
    """Text pairs put the second text in segment 1: a checkpoint with type_vocab_size=1 has no embedding for
    it, so a file with a pair column is a FastElectraError for it (the model would reject token type 1)."""
    if examples.pairs is not None and config.type_vocab_size < 2:
        raise FastElectraError(f"{examples.path} has a pair column {pair_column!r} but checkpoint {model_dir} has "
                               f"type_vocab_size={config.type_vocab_size} (one segment); remove the column or set "
                               "--pair-column to one the file lacks")


def encode(tok, examples: Examples, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, token type ids) per example, [CLS] A [SEP] (B [SEP]) truncated to ``max_length``."""
    tok.enable_truncation(max_length)
    try:
        inputs = list(zip(examples.texts, examples.pairs)) if examples.pairs is not None else examples.texts
        encodings = tok.encode_batch(inputs)
    finally:
        tok.no_truncation()
    return [(e.ids, e.type_ids) for e in encodings]


def make_batches(encoded, labels: list[int] | None, batch_size: int, pad_id: int, order=None):
    """Yield (input_ids, attention_mask, token_type_ids, labels or None) CPU tensors, each batch padded to
    its longest sequence; ``order`` is a permutation of the examples (None: file order)."""
    order = range(len(encoded)) if order is None else order
    order = list(order)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        types = torch.zeros((len(idx), t), dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for row, i in enumerate(idx):
            e_ids, e_types = encoded[i]
            ids[row, :len(e_ids)] = torch.tensor(e_ids)
            types[row, :len(e_types)] = torch.tensor(e_types)
            mask[row, :len(e_ids)] = 1
        y = None if labels is None else torch.tensor([labels[i] for i in idx])
        yield ids, mask, types, y


# ----------------------------------------------------------------------------- optimizer
def layerwise_param_groups(model: ElectraForSequenceClassification, lr: float, layer_decay: float,
                           weight_decay: float) -> list[dict]:
    """AdamW parameter groups with ELECTRA's layer-wise lr decay (google-research/electra,
    model/optimization.py ``_get_layer_lrs``: embeddings at depth 0, layer l at depth l + 1, the head at
    depth L + 2, lr·decay^(L + 2 - depth)): head lr, encoder layer l (0-based) of L lr·decay^(L + 1 - l),
    embeddings and embeddings_project lr·decay^(L + 2). Biases and LayerNorm weights get no weight decay.
    The groups' "depth" is the exponent of decay."""
    n_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("electra.encoder.layer."):
            depth = n_layers + 1 - int(name.split(".")[3])
        elif name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
            depth = n_layers + 2
        else:
            depth = 0
        decay = decays(name)
        g = groups.setdefault((depth, decay), {"params": [], "lr": lr * layer_decay ** depth,
                                               "weight_decay": weight_decay if decay else 0.0, "depth": depth})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model, batches, device) -> torch.Tensor:
    """fp32 logits (N, num_labels) for all batches, in order."""
    model.eval()
    out = []
    for ids, mask, types, _ in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(ids.to(device), mask.to(device), types.to(device)).float().cpu())
    return torch.cat(out)


def evaluate(y_true: list[int], y_pred: list[int], label_names: list[str]) -> dict:
    """Accuracy, macro precision / recall / F1 (over the labels present in y_true or y_pred) and the
    confusion matrix (rows: true label, columns: predicted, in ``label_names`` order)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(label_names))))
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "n": len(y_true), "labels": list(label_names),
            "confusion_matrix": cm.tolist()}


def format_metrics(m: dict) -> str:
    lines = [f"accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
             f"f1 {m['f1']:.4f}  (macro, {m['n']} examples)", "confusion matrix (rows: true, columns: predicted):"]
    width = max(6, *(len(x) for x in m["labels"]))
    lines.append(" " * width + " " + " ".join(f"{x:>{width}}" for x in m["labels"]))
    for name, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"{name:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def choose_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise FastElectraError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastElectraError(f"--device {name}: torch sees no CUDA GPU here")
    return torch.device(name)


# ----------------------------------------------------------------------------- fine-tuning
def stratified_split(labels: list[str], dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, dev rows): about ``dev_fraction`` of each label's rows, chosen at random (``seed``), held
    out for dev, but never a label's last row, so every label stays trainable; at least one row in all."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    by_label: dict[str, list[int]] = {}
    for i in perm:
        by_label.setdefault(labels[i], []).append(i)
    held = set()
    for rows in by_label.values():
        held.update(rows[:min(len(rows) - 1, round(len(rows) * dev_fraction))])
    if not held:
        rows = max(by_label.values(), key=len)
        if len(rows) < 2:
            raise FastElectraError(f"no dev file and no label with 2 rows to spare one for a dev split; pass --dev "
                                   f"(labels: {sorted(by_label)})")
        held.add(rows[0])
    return [i for i in perm if i not in held], [i for i in perm if i in held]


def _check_options(**opts) -> None:
    for name, (value, low, integer) in opts.items():
        ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or value < low:
            raise FastElectraError(f"--{name.replace('_', '-')} must be {'an integer' if integer else 'a number'} "
                                   f">= {low}, got {value!r}")


def finetune(checkpoint: str, train_file: str, out: str, dev_file: str | None = None, *, tokenizer: str | None = None,
             epochs: int = 3, batch_size: int = 32, lr: float = 1e-4, layer_decay: float = 0.8,
             weight_decay: float = 0.0, warmup: float = 0.1, max_seq_length: int = 128, patience: int = 2,
             metric: str = "accuracy", dev_fraction: float = 0.1, seed: int = 0, device: str | None = None,
             backend: str = "auto", text_column: str = "text", pair_column: str = "text_pair",
             label_column: str = "label", log=print) -> dict:
    """Fine-tune ``checkpoint`` on ``train_file``, select on ``dev_file`` (or a ``dev_fraction`` split of
    the training rows) and save the best model to ``out``. Returns the summary also written to
    ``out/finetune_metrics.json``: best epoch, dev metrics (confusion matrix included), per-epoch history."""
    log = log or (lambda *a, **k: None)
    _check_options(epochs=(epochs, 1, True), batch_size=(batch_size, 1, True), max_seq_length=(max_seq_length, 3, True),
                   patience=(patience, 1, True), lr=(lr, 0.0, False), layer_decay=(layer_decay, 0.0, False),
                   weight_decay=(weight_decay, 0.0, False), warmup=(warmup, 0.0, False))
    check_seed(seed)
    if lr <= 0 or not layer_decay > 0 or layer_decay > 1 or warmup >= 1:
        raise FastElectraError(f"need --lr > 0, 0 < --layer-decay <= 1 and 0 <= --warmup < 1; got lr={lr}, "
                               f"layer_decay={layer_decay}, warmup={warmup}")
    if metric not in ("accuracy", "f1"):
        raise FastElectraError(f"--metric must be accuracy or f1, got {metric!r}")
    if backend not in _backend.BACKENDS:
        raise FastElectraError(f"--backend must be one of {_backend.BACKENDS}, got {backend!r}")
    device = choose_device(device)
    columns = dict(text_column=text_column, pair_column=pair_column, label_column=label_column)

    # data
    train = read_examples(train_file, role="train", **columns)
    if dev_file is not None:
        dev = read_examples(dev_file, role="dev", **columns)
        if (train.pairs is None) != (dev.pairs is None):
            has, lacks = (train_file, dev_file) if dev.pairs is None else (dev_file, train_file)
            raise FastElectraError(f"{has} has a {pair_column!r} column but {lacks} does not; both or neither")
        unseen = sorted(set(dev.labels) - set(train.labels))
        if unseen:
            raise FastElectraError(f"dev file {dev_file} has labels never seen in train file {train_file}: {unseen}")
    else:
        if not 0.0 < dev_fraction < 1.0 or len(train) < 2:
            raise FastElectraError(f"no dev file: need 0 < dev_fraction < 1 and at least 2 training rows "
                                   f"(got {dev_fraction} and {len(train)})")
        train_rows, dev_rows = stratified_split(train.labels, dev_fraction, seed)
        dev = _subset(train, dev_rows, f"{train_file} (held out)")
        train = _subset(train, train_rows, train_file)
    label_set = sorted(set(train.labels))
    if len(label_set) < 2:
        raise FastElectraError(f"train file {train_file} has a single label {label_set}; classification needs at "
                               "least 2")

    # model and tokenizer
    model_dir = resolve_checkpoint(checkpoint)
    config = read_config(model_dir)
    check_pair_column(train, config, model_dir, pair_column)
    tok, tok_source = load_classifier_tokenizer(model_dir, tokenizer, config)
    # the saved config.json names the special tokens of the tokenizer saved beside it
    special = {k: v for k, v in special_token_ids(tok).items() if k != "vocab_size"}
    old = config.extra.get("label2id")
    keep_head = (isinstance(old, dict) and sorted(old) == label_set and "ElectraForSequenceClassification"
                 in config.extra.get("architectures", [])
                 and config.extra.get("problem_type") in (None, "single_label_classification"))
    label_names = sorted(old, key=old.get) if keep_head else label_set
    label2id = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)
    try:
        model = ElectraForSequenceClassification.from_pretrained(
            model_dir, new_head=not keep_head, num_labels=len(label_names), backend=backend,
            unpad=_backend.resolve(backend) != "eager",
            id2label={str(i): name for i, name in enumerate(label_names)}, label2id=label2id, **special)
    except ValueError as e:
        raise FastElectraError(f"cannot load checkpoint {model_dir} for sequence classification: {e}") from e
    model.to(device)
    max_len = min(max_seq_length, config.max_position_embeddings)
    if max_len < max_seq_length:
        log(f"--max-seq-length {max_seq_length} is more than the model's max_position_embeddings "
            f"{config.max_position_embeddings}: examples are cut at {max_len} tokens")
    train_enc, dev_enc = encode(tok, train, max_len), encode(tok, dev, max_len)
    y_train = [label2id[x] for x in train.labels]
    y_dev = [label2id[x] for x in dev.labels]
    pad_id = config.pad_token_id
    log(f"fine-tuning {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
        f"{len(train)} train / {len(dev)} dev examples, labels {label_names}, device {device}, "
        f"backend {_backend.resolve(backend)}")

    # optimizer and schedule
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(layerwise_param_groups(model, lr, layer_decay, weight_decay), lr=lr,
                            betas=(0.9, 0.999), eps=1e-6, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(warmup * total), total))

    gen = torch.Generator().manual_seed(seed)
    history, best, best_epoch, bad = [], -1.0, 0, 0
    os.makedirs(out, exist_ok=True)
    for epoch in range(1, epochs + 1):
        model.train()
        t0, loss_sum = time.time(), 0.0
        order = torch.randperm(len(train), generator=gen).tolist()
        for ids, mask, types, y in make_batches(train_enc, y_train, batch_size, pad_id, order):
            ids, mask, types, y = ids.to(device), mask.to(device), types.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids, mask, types)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_step(opt, model.parameters(), 1.0)
            sched.step()
            loss_sum += loss.item() * len(y)
        logits = predict_logits(model, make_batches(dev_enc, None, batch_size, pad_id), device)
        m = evaluate(y_dev, logits.argmax(-1).tolist(), label_names)
        improved = m[metric] > best
        history.append({"epoch": epoch, "train_loss": loss_sum / len(train), "seconds": time.time() - t0,
                        **{k: m[k] for k in ("accuracy", "precision", "recall", "f1")}})
        log(f"epoch {epoch}: train loss {loss_sum / len(train):.4f}, dev accuracy {m['accuracy']:.4f}, "
            f"macro f1 {m['f1']:.4f}{' (best, saved)' if improved else ''}")
        if improved:
            best, best_epoch, best_metrics, bad = m[metric], epoch, m, 0
            model.save_pretrained(out)
            save_tokenizer_files(tok, out, model_max_length=config.max_position_embeddings)
        else:
            bad += 1
            if bad >= patience:
                log(f"early stop: no dev {metric} improvement for {patience} epochs")
                break

    summary = {"checkpoint": model_dir, "tokenizer": tok_source, "out": out, "metric": metric,
               "best_epoch": best_epoch, "dev": best_metrics, "history": history, "train_file": train_file,
               "dev_file": dev.path, "labels": label_names}
    with open(os.path.join(out, METRICS_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"best epoch {best_epoch}, dev {format_metrics(best_metrics)}")
    log(f"saved to {out}")
    return summary


def _subset(ex: Examples, idx: list[int], path: str) -> Examples:
    def pick(xs):
        return None if xs is None else [xs[i] for i in idx]
    return Examples(path, pick(ex.rows), ex.columns, pick(ex.texts), pick(ex.pairs), pick(ex.labels))


# ----------------------------------------------------------------------------- CLI
def add_column_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--text-column", default="text", help="column with the text (default: text)")
    a("--pair-column", default="text_pair", help="optional second text column, used when present (default: text_pair)")
    a("--label-column", default="label", help="column with the label (default: label)")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="checkpoint folder: fastelectra or HF ELECTRA (a pretraining run folder works)")
    a("--train", required=True, help="training data: .csv, .tsv or .jsonl with text[, text_pair], label")
    a("--dev", help="dev data for evaluation and early stopping (default: hold out --dev-fraction of --train)")
    a("--out", required=True, help="output folder: the best model in HF format + tokenizer + metrics")
    a("--tokenizer", help="tokenizer folder, tokenizer.json or vocab.txt (default: the checkpoint's)")
    a("--epochs", type=int, default=3, help="passes over --train (default: 3)")
    a("--batch-size", type=int, default=32, help="examples per optimizer step (default: 32)")
    a("--lr", type=float, default=1e-4, help="peak learning rate of the classification head; encoder layer l "
      "(0 = bottom) of L gets lr·layer_decay^(L+1-l), the embeddings lr·layer_decay^(L+2) (default: 1e-4)")
    a("--layer-decay", type=float, default=0.8, help="layer-wise learning-rate decay (default: 0.8)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    a("--warmup", type=float, default=0.1, help="fraction of the steps spent in linear warmup (default: 0.1)")
    a("--max-seq-length", type=int, default=128, help="tokens per example, [CLS] and [SEP] included; longer ones "
      "are cut (default: 128, at most the model's max_position_embeddings)")
    a("--patience", type=int, default=2, help="stop after this many epochs without dev improvement (default: 2)")
    a("--metric", choices=["accuracy", "f1"], default="accuracy",
      help="dev metric for model selection (default: accuracy)")
    a("--dev-fraction", type=float, default=0.1,
      help="held-out fraction of --train when --dev is not given (default: 0.1)")
    a("--seed", type=int, default=0, help="seed of the head's initialisation, the split and the order (default: 0)")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--backend", choices=list(_backend.BACKENDS), default="auto", help="kernels: fused, eager (torch) or auto")
    add_column_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    try:
        finetune(args.model, args.train, args.out, args.dev, tokenizer=args.tokenizer, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
                 weight_decay=args.weight_decay, warmup=args.warmup, max_seq_length=args.max_seq_length,
                 patience=args.patience, metric=args.metric, dev_fraction=args.dev_fraction, seed=args.seed,
                 device=args.device, backend=args.backend, text_column=args.text_column,
                 pair_column=args.pair_column, label_column=args.label_column)
    except (FastElectraError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
