#!/usr/bin/env python
"""Mutation check: break one equation (or pipeline step) on purpose and make sure a fast test fails.

    python scripts/mutation_check.py            # every mutation below (~2 min on 2 cores)
    python scripts/mutation_check.py spread     # those whose name contains "spread"

Each mutation replaces one exact snippet of a source file, runs the named fast tests (``pytest -x``), and restores
the file (always, also on Ctrl-C). A mutation that leaves its tests passing is a test that cannot fail for what
it claims: the script exits 1 and names it. Add a line here when you add an equation or a pipeline step.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, original snippet, mutated snippet, tests that must fail)
MUTATIONS = [
    ("rome: u = k* instead of C^-1 k*", "massedit/editing/rome.py",
     "u = (C_inv @ k_star.unsqueeze(1)).squeeze(1) if C_inv is not None else k_star", "u = k_star",
     ["tests/test_rome_tiny.py", "tests/test_rome_memit_callbacks.py"]),
    ("memit: λI instead of λC in the solve", "massedit/editing/memit.py",
     "torch.linalg.solve(lam * C.double() + K @ K.T, K)",
     "torch.linalg.solve(lam * torch.eye(K.shape[0], dtype=K.dtype, device=K.device) + K @ K.T, K)",
     ["tests/test_memit_tiny.py", "tests/test_rome_memit_callbacks.py"]),
    ("memit: spread_residual without the division", "massedit/editing/memit.py",
     "return E.double() / (n_layers - i)", "return E.double()",
     ["tests/test_memit_tiny.py", "tests/test_rome_memit_callbacks.py"]),
    ("nethook: StopForward never raised", "massedit/core/nethook.py",
     "            if stop:\n                raise StopForward()", "            if False:\n                raise StopForward()",
     ["tests/test_adapters.py::test_stop_forward_early"]),
    ("nethook: TraceDict stops after the first module", "massedit/core/nethook.py",
     "last = max(layers, key=lambda n: order[n])", "last = min(layers, key=lambda n: order[n])",
     ["tests/test_adapters.py::test_stop_forward_early"]),
    ("nethook: TraceDict stops inside a listed module that contains the last one", "massedit/core/nethook.py",
     "        if enclosing:", "        if False:",
     ["tests/test_adapters.py::test_stop_forward_early", "tests/test_rome_tiny.py::test_rome_on_the_last_layer"]),
    ("pipeline: ApplyEdit does not apply the deltas", "massedit/callbacks/apply_edit.py",
     "self._backup = apply_deltas(model, deltas)", "self._backup = None",
     ["tests/test_edit_job.py"]),
    ("export: save_pretrained without the deltas", "massedit/tasks/export.py",
     "    if applied:\n        return export_hf(model, tok, out_dir, manifest)",
     "    if True:\n        return export_hf(model, tok, out_dir, manifest)",
     ["tests/test_api.py::test_edit_result_apply_revert_save_and_export_loads_with_transformers"]),
    ("hparams: layers not at the paper's relative depth", "massedit/editing/hparams.py",
     'PAPER_DEPTH = {"memit": (3, 8, 28), "rome": (5, 5, 28)}', 'PAPER_DEPTH = {"memit": (3, 8, 24), "rome": (5, 5, 28)}',
     ["tests/test_api.py::test_model_hf_hparams_from_the_architecture_and_early_failures"]),
    ("sweep: interrupted trials not re-queued on resume", "massedit/tasks/sweep.py",
     "        self._requeue(interrupted)\n", "        pass\n",
     ["tests/test_sweep.py::test_resume_does_not_rerun_finished_trials"]),
    ("W&B: nested config (a sweep's `method: rome` replaces the section)", "massedit/tasks/runs.py",
     "config=flat, job_type=cfg.job_type", "config=config_dict, job_type=cfg.job_type",
     ["tests/test_wandb.py::test_simulated_wandb_agent_keeps_the_nested_config"]),
    ("MEND: resume restores no counters", "massedit/lightning_modules/mend.py",
     '        self.iters = int(prog.get("iters", 0))', "        pass",
     ["tests/test_lightning_eco.py::test_mend_resumes_from_ckpt_path"]),
    # reliability (issue 15)
    ("guard: ApplyEdit skips the finiteness / update-norm check", "massedit/callbacks/apply_edit.py",
     "            check_update_norms(deltas, dict(", "            (lambda *a, **k: None)(deltas, dict(",
     ["tests/test_reliability.py::test_apply_edit_refuses_bad_deltas_before_writing"]),
    ("guard: MEMIT's z not checked before the weight is written", "massedit/editing/memit.py",
     'check_finite(t.target, f"memit: target z', '(lambda *a, **k: None)(t.target, f"memit: target z',
     ["tests/test_reliability.py::test_memit_nonfinite_intermediates_stop_before_any_write"]),
    ("validation: the run directory is created before the run is validated", "massedit/tasks/edit.py",
     "    checked = validate_job(job)  # everything checkable before the run directory exists (tasks/validate.py)\n"
     "    requests = checked.requests\n    run = setup_run(job, run_dir=checked.run_dir)",
     "    run = setup_run(job)\n    checked = validate_job(job)\n    requests = checked.requests",
     ["tests/test_malformed_inputs.py::test_malformed_input[counterfact-no-subject]"]),
    ("safe loading: the z cache unpickles its entries", "massedit/editing/target_cache.py",
     'd = torch.load(p, map_location="cpu", weights_only=True)', 'd = torch.load(p, map_location="cpu", weights_only=False)',
     ["tests/test_reliability.py::test_target_cache_entry_with_pickle_is_discarded"]),
    ("cache: a statistics cache entry's checksum is not compared", "massedit/stats/cache.py",
     'if stored is not None and stored != content_checksum({"sum": total, "count": count_t}):', "if False:",
     ["tests/test_reliability.py::test_corrupt_stats_cache_entry_is_discarded_and_recomputed"]),
    ("io: a killed writer's temporary file is never recognised as stale", "massedit/core/io.py",
     "        return not _pid_alive(int(m[\"pid\"]))", "        return False",
     ["tests/test_reliability.py::test_kill_9_during_a_checkpoint_write_leaves_no_orphan_after_the_next_run"]),
]


def _pytest(tests) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def run(mutation) -> bool:
    """True when the tests fail with the mutation in place (the wanted outcome)."""
    name, rel, old, new, tests = mutation
    path = ROOT / rel
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{name}: the snippet to mutate occurs {original.count(old)} times in {rel}; update MUTATIONS")
    try:
        path.write_text(original.replace(old, new))
        r = _pytest(tests)
    finally:
        path.write_text(original)
    return r.returncode != 0


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m[0] for a in argv)]
    tests = list(dict.fromkeys(t for m in chosen for t in m[4]))
    base = _pytest(tests)  # unmutated, the same tests must pass (else every mutation would look "caught")
    if base.returncode != 0:
        print(base.stdout[-3000:], base.stderr[-2000:])
        raise SystemExit("the unmutated tests fail; fix them first")
    survivors = []
    for m in chosen:
        caught = run(m)
        print(f"{'caught  ' if caught else 'SURVIVED'}  {m[0]}  ({', '.join(m[4])})", flush=True)
        if not caught:
            survivors.append(m[0])
    if survivors:
        print(f"{len(survivors)} mutation(s) survived: the tests above cannot fail for what they claim")
        return 1
    print(f"all {len(chosen)} mutation(s) caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
