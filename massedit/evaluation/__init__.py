"""CounterFact / zsRE evaluation (REFERENCE_SPEC §4): prompt scoring, per-case and summary metrics (torchmetrics),
generation metrics and reports, in plain torch/numpy. The Lightning loop is ``massedit.lightning_modules.evaluation``;
``massedit.tasks.evaluate.evaluate(model, tok, requests)`` runs it."""
