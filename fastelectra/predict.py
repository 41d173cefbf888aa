"""``fastelectra predict``: label a CSV/TSV or JSON-lines file with a fine-tuned sequence classifier.

The output keeps every input column and adds the prediction column (``--output-column``, default
``predicted_label``) and, for classifiers, the score column (``--score-column``, default ``score``); a name
that is already an input column, or the same name for both, is an error. What they hold follows the task
of the model's head, read from config.json as transformers reads it (``problem_type``, else ``num_labels``):

    single_label_classification   (also num_labels >= 2 without a problem_type; what ``fastelectra finetune``
                                  trains) the name of the argmax class (config.json's id2label, LABEL_i where
                                  it has none) and its softmax probability
    regression                    (also num_labels == 1 without a problem_type) the head's raw output: a
                                  number (a list of numbers in id order when num_labels > 1); no score column
    multi_label_classification    the names of the labels whose sigmoid probability is above 0.5, in id
                                  order (an empty list when none is), and those probabilities in the same order

Numbers are rounded to 6 decimals. The output format follows the output file's suffix: JSON-lines holds lists
as JSON arrays; CSV/TSV cells hold them as JSON text (``["pos", "funny"]``, ``[0.912, 0.634]``), which
``json.loads`` reads back. For a single-label classifier whose input has a label column with only known
labels, the metrics of :func:`fastelectra.finetune.evaluate` are returned (and printed by the CLI) too.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from . import backend as _backend
from .data import FastElectraError
from .finetune import (_check_options, _file_format, add_column_arguments, check_pair_column, choose_device, encode,
                       evaluate, format_metrics, load_classifier_tokenizer, make_batches, predict_logits, read_config,
                       read_examples, resolve_checkpoint)
from .hf import CheckpointMismatchError
from .model import ElectraForSequenceClassification

__all__ = ["predict", "problem_type", "add_cli_arguments", "run_cli"]

PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")  # transformers' names


def label_names(config) -> list[str]:
    """The class names in id order, from config.json's id2label (LABEL_i where it has none)."""
    id2label = config.extra.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(config.num_labels)]


def problem_type(config, model_dir: str) -> str:
    """The task of a classifier checkpoint's head, as transformers' ElectraForSequenceClassification reads its
    config: ``problem_type`` when set, else regression for num_labels == 1 and single-label classification
    otherwise. An unknown problem_type, or a single-label head with one label, is a FastElectraError."""
    problem = config.extra.get("problem_type")
    if problem is None:
        return "regression" if config.num_labels == 1 else "single_label_classification"
    if problem not in PROBLEM_TYPES:
        raise FastElectraError(f"checkpoint {model_dir}: config.json's problem_type must be one of "
                               f"{', '.join(PROBLEM_TYPES)} (or absent), got {problem!r}")
    if problem == "single_label_classification" and config.num_labels < 2:
        raise FastElectraError(f"checkpoint {model_dir}: a single_label_classification head needs num_labels >= 2, "
                               f"got num_labels={config.num_labels}")
    return problem


def head_outputs(logits, problem: str, names: list[str]) -> tuple[list, list | None]:
    """(prediction per row, score per row or None) from the (N, num_labels) logits, as the module docstring
    describes for each ``problem`` type."""
    if problem == "regression":
        return [round(v[0], 6) if len(v) == 1 else [round(x, 6) for x in v] for v in logits.tolist()], None
    if problem == "multi_label_classification":
        labels, scores = [], []
        for p in logits.sigmoid().tolist():
            chosen = [i for i, x in enumerate(p) if x > 0.5]
            labels.append([names[i] for i in chosen])
            scores.append([round(p[i], 6) for i in chosen])
        return labels, scores
    score, pred = logits.softmax(-1).max(-1)
    return [names[i] for i in pred.tolist()], [round(x, 6) for x in score.tolist()]


def write_rows(path: str, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` in the format of ``path``'s suffix; in CSV/TSV a list or dict value is written as JSON text."""
    fmt = _file_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                w = csv.DictWriter(f, fieldnames=columns, delimiter="," if fmt == "csv" else "\t")
                w.writeheader()
                w.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                             for k, v in r.items()} for r in rows)
    except OSError as e:
        raise FastElectraError(f"cannot write output file {path}: {e}") from e


def predict(model: str, input_file: str, output_file: str, *, tokenizer: str | None = None, batch_size: int = 64,
            max_seq_length: int = 512, device: str | None = None, backend: str = "auto",
            text_column: str = "text", pair_column: str = "text_pair", label_column: str = "label",
            output_column: str = "predicted_label", score_column: str = "score") -> dict:
    """Write ``input_file``'s rows with ``output_column`` (the prediction) and, for classifiers,
    ``score_column`` to ``output_file`` (see the module docstring). Returns {"n", "output", "labels",
    "problem_type"} plus "metrics" when a single-label classifier's input carries known labels."""
    _check_options(batch_size=(batch_size, 1, True), max_seq_length=(max_seq_length, 3, True))
    if backend not in _backend.BACKENDS:
        raise FastElectraError(f"--backend must be one of {_backend.BACKENDS}, got {backend!r}")
    _file_format(output_file)                                     # an unknown output type fails before the work
    dev = choose_device(device)
    model_dir = resolve_checkpoint(model)
    config = read_config(model_dir)                               # a bad config.json is reported as such
    problem = problem_type(config, model_dir)
    if problem != "regression" and output_column == score_column:
        raise FastElectraError(f"--output-column and --score-column are both {output_column!r}; give them "
                               "different names")
    try:
        clf = ElectraForSequenceClassification.from_pretrained(model_dir, backend=backend)
    except CheckpointMismatchError as e:
        if any(k.startswith("classifier.") for k in e.missing):
            raise FastElectraError(f"{model_dir} is not a sequence classifier (it has no classifier weights; fine-tune "
                                   f"it first with `fastelectra finetune`): {e}") from e
        raise FastElectraError(f"cannot load checkpoint {model_dir} as a sequence classifier: {e}") from e
    except ValueError as e:          # a corrupt or sharded weights file, a tensor of the wrong shape
        raise FastElectraError(f"cannot load checkpoint {model_dir}: {e}") from e
    names = label_names(clf.config)
    tok, _ = load_classifier_tokenizer(model_dir, tokenizer, clf.config)
    ex = read_examples(input_file, role="input", text_column=text_column, pair_column=pair_column,
                       label_column=label_column, require_labels=False)
    added = {"--output-column": output_column}                    # option: the column it adds
    if problem != "regression":
        added["--score-column"] = score_column
    for option, name in added.items():
        if name in ex.columns:
            raise FastElectraError(f"{option} {name!r} is already a column of {input_file}; choose another name with "
                                   f"{option}")
    check_pair_column(ex, clf.config, model_dir, pair_column)
    enc = encode(tok, ex, min(max_seq_length, clf.config.max_position_embeddings))
    logits = predict_logits(clf.to(dev), make_batches(enc, None, batch_size, clf.config.pad_token_id), dev)
    values, scores = head_outputs(logits, problem, names)
    rows = [{**row, output_column: v} for row, v in zip(ex.rows, values)]
    if scores is not None:
        for row, s in zip(rows, scores):
            row[score_column] = s
    write_rows(output_file, rows, ex.columns + list(added.values()))
    result = {"n": len(rows), "output": output_file, "labels": names, "problem_type": problem}
    if problem == "single_label_classification" and ex.labels is not None and set(ex.labels) <= set(names):
        ids = {name: i for i, name in enumerate(names)}
        result["metrics"] = evaluate([ids[x] for x in ex.labels], logits.argmax(-1).tolist(), names)
    return result


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="a fine-tuned classifier folder (the --out of `fastelectra finetune`)")
    a("--input", required=True, help="rows to label: .csv, .tsv or .jsonl with a text column")
    a("--output", required=True, help="where to write the rows with the prediction and score (.csv/.tsv/.jsonl)")
    a("--tokenizer", help="tokenizer folder, tokenizer.json or vocab.txt (default: the model's)")
    a("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    a("--max-seq-length", type=int, default=512, help="tokens per example, [CLS] and [SEP] included; longer ones "
      "are cut (default: 512, at most the model's max_position_embeddings; finetune's default is 128)")
    a("--output-column", default="predicted_label", help="name of the added prediction column (default: "
      "predicted_label): the label, the labels over 0.5 (multi-label) or the value (regression)")
    a("--score-column", default="score", help="name of the added score column (default: score): the label's "
      "softmax probability, or the sigmoid probabilities of the labels (multi-label); none for regression")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--backend", choices=list(_backend.BACKENDS), default="auto", help="kernels: fused, eager (torch) or auto")
    add_column_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    try:
        r = predict(args.model, args.input, args.output, tokenizer=args.tokenizer, batch_size=args.batch_size,
                    max_seq_length=args.max_seq_length, device=args.device, backend=args.backend,
                    text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
                    output_column=args.output_column, score_column=args.score_column)
    except (FastElectraError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['n']} predictions to {r['output']}")
    if "metrics" in r:
        print(format_metrics(r["metrics"]))
    return 0
