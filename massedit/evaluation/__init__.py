"""CounterFact / zsRE evaluation (REFERENCE_SPEC §4): torchmetrics metrics run in a Lightning validate loop.

Public API::

    evaluate(model, tok, requests, eval_cfg, *, stage="post", trainer_kwargs=None) -> EvalResult
    write_report(pre, post, out_dir, logger=None, title="") -> str  (Markdown table)
    run_eval_only(cfg, run)                                          (edit.py mode=eval [deltas=PATH])
"""
from massedit.evaluation.aggregate import METRICS_VERSION
from massedit.evaluation.api import EVAL_DEFAULTS, EvalResult, eval_config, evaluate, run_eval_only
from massedit.evaluation.report import markdown_table, summary_dict, write_report

__all__ = ["EVAL_DEFAULTS", "EvalResult", "METRICS_VERSION", "eval_config", "evaluate", "markdown_table",
           "run_eval_only", "summary_dict", "write_report"]
