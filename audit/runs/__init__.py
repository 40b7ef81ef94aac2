"""The run store and what reads it: one folder per run, the history index, the
reviewers' decisions, comparisons of two runs, and MLflow logging.

    store       run folders: manifest, chunks, atomic writes, locks, status
    history     the store's index (history.sqlite): runs, verdicts, flags
    decisions   the reviewers' decisions log (decisions.jsonl)
    compare     two runs side by side: per-class deltas, new and resolved flags
    mlflow_log  a finished run logged to MLflow
"""
