"""``fastelectra predict``: label a CSV/TSV or JSON-lines file with a fine-tuned sequence classifier.

The output keeps every input column and adds ``predicted_label`` (the name from the model's id2label)
and ``score`` (its softmax probability); its format follows the output file's suffix. When the input
has a label column with only known labels, the metrics of :func:`fastelectra.finetune.evaluate` are
returned (and printed by the CLI) too.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from . import backend as _backend
from .data import FastElectraError
from .finetune import (_check_options, _file_format, add_column_arguments, choose_device, encode, evaluate,
                       format_metrics, load_classifier_tokenizer, make_batches, predict_logits, read_examples,
                       resolve_checkpoint)
from .model import ElectraForSequenceClassification

__all__ = ["predict", "add_cli_arguments", "run_cli"]


def label_names(config) -> list[str]:
    """The class names in id order, from config.json's id2label (LABEL_i where it has none)."""
    id2label = config.extra.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(config.num_labels)]


def write_rows(path: str, rows: list[dict], columns: list[str]) -> None:
    fmt = _file_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                w = csv.DictWriter(f, fieldnames=columns, delimiter="," if fmt == "csv" else "\t")
                w.writeheader()
                w.writerows(rows)
    except OSError as e:
        raise FastElectraError(f"cannot write output file {path}: {e}") from e


def predict(model: str, input_file: str, output_file: str, *, tokenizer: str | None = None, batch_size: int = 64,
            max_seq_length: int = 512, device: str | None = None, backend: str = "auto",
            text_column: str = "text", pair_column: str = "text_pair", label_column: str = "label",
            output_column: str = "predicted_label") -> dict:
    """Write ``input_file``'s rows with ``output_column`` and ``score`` to ``output_file``. Returns
    {"n", "output", "labels"} plus "metrics" when the input carries known labels."""
    _check_options(batch_size=(batch_size, 1, True), max_seq_length=(max_seq_length, 3, True))
    if backend not in _backend.BACKENDS:
        raise FastElectraError(f"--backend must be one of {_backend.BACKENDS}, got {backend!r}")
    _file_format(output_file)                                     # an unknown output type fails before the work
    dev = choose_device(device)
    model_dir = resolve_checkpoint(model)
    try:
        clf = ElectraForSequenceClassification.from_pretrained(model_dir, backend=backend)
    except ValueError as e:
        raise FastElectraError(f"{model_dir} is not a sequence classifier (fine-tune it first with "
                               f"`fastelectra finetune`): {e}") from e
    names = label_names(clf.config)
    tok, _ = load_classifier_tokenizer(model_dir, tokenizer, clf.config)
    ex = read_examples(input_file, role="input", text_column=text_column, pair_column=pair_column,
                       label_column=label_column, require_labels=False)
    enc = encode(tok, ex, min(max_seq_length, clf.config.max_position_embeddings))
    probs = predict_logits(clf.to(dev), make_batches(enc, None, batch_size, clf.config.pad_token_id), dev).softmax(-1)
    score, pred = probs.max(-1)
    rows = [{**row, output_column: names[p], "score": round(s, 6)} for row, p, s in zip(ex.rows, pred.tolist(),
                                                                                         score.tolist())]
    columns = ex.columns + [c for c in (output_column, "score") if c not in ex.columns]
    write_rows(output_file, rows, columns)
    result = {"n": len(rows), "output": output_file, "labels": names}
    if ex.labels is not None and set(ex.labels) <= set(names):
        ids = {name: i for i, name in enumerate(names)}
        result["metrics"] = evaluate([ids[x] for x in ex.labels], pred.tolist(), names)
    return result


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="a fine-tuned classifier folder (the --out of `fastelectra finetune`)")
    a("--input", required=True, help="rows to label: .csv, .tsv or .jsonl with a text column")
    a("--output", required=True, help="where to write the rows with predicted_label and score (.csv/.tsv/.jsonl)")
    a("--tokenizer", help="tokenizer folder, tokenizer.json or vocab.txt (default: the model's)")
    a("--batch-size", type=int, default=64)
    a("--max-seq-length", type=int, default=512)
    a("--output-column", default="predicted_label", help="name of the added label column")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--backend", choices=list(_backend.BACKENDS), default="auto", help="kernels: fused, eager (torch) or auto")
    add_column_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    try:
        r = predict(args.model, args.input, args.output, tokenizer=args.tokenizer, batch_size=args.batch_size,
                    max_seq_length=args.max_seq_length, device=args.device, backend=args.backend,
                    text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
                    output_column=args.output_column)
    except (FastElectraError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['n']} predictions to {r['output']}")
    if "metrics" in r:
        print(format_metrics(r["metrics"]))
    return 0
