"""Offline runner for W&B sweep files (``configs/sweeps/*.yaml``): grid and random search, resumable.

The same YAML file runs two ways:

* with a W&B server: ``wandb sweep configs/sweeps/ftw_weight_decay.yaml`` then ``wandb agent <id>``
  (the agent runs the file's ``command``, e.g. ``python train.py method.weight_decay=0.001 ...``);
* offline: ``python sweep.py configs/sweeps/ftw_weight_decay.yaml`` expands the grid (or samples the
  random search), runs the trials one after another (or one per device, ``--devices 0,1``), each as a
  W&B run in one group, and keeps its state in ``<out>/sweep_state.json`` (atomic writes) so that an
  interrupted sweep resumes without rerunning finished trials. At the end it writes ``summary.md``,
  ``summary.json`` and ``sweep.png`` (efficacy, paraphrase, neighbourhood and Score against the swept
  value, best Score marked) and logs table and plot to W&B.

Supported sweep keys: ``name, program, method (grid|random), metric {name, goal}, parameters, command,
run_cap, project, entity``. Parameters: ``value``, ``values`` (+ ``probabilities``), ``distribution``
(``constant, categorical, int_uniform, uniform, q_uniform, log_uniform, log_uniform_values,
q_log_uniform_values, normal, q_normal, log_normal``) with ``min/max/mu/sigma/q``; nested
``parameters`` blocks are flattened to dotted names (``method.weight_decay``).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from massedit.core.io import atomic_write_json, atomic_write_text, load_json, stable_hash
from massedit.core.errors import InputError

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
METHODS = ("grid", "random")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values", "normal", "q_normal", "log_normal")
SUMMARY_COLUMNS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "score")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default


class SweepSpecError(InputError):
    pass


@dataclass
class SweepSpec:
    """A parsed W&B sweep file."""

    path: Path | None
    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    program: str | None = None
    command: list[str] = field(default_factory=lambda: list(DEFAULT_COMMAND))
    run_cap: int | None = None
    project: str = "massedit"
    entity: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, extra: Sequence[str] = ()) -> str:
        """Identity of the sweep for resuming (parameters, method, metric, command, program, extra args)."""
        return stable_hash({"method": self.method, "parameters": self.parameters, "metric": [self.metric, self.goal],
                            "command": self.command, "program": self.program, "extra": list(extra)})

    def varying(self) -> list[str]:
        """Parameters that take more than one value."""
        out = []
        for k, p in self.parameters.items():
            d = _distribution(k, p)
            if d == "constant":
                continue
            if d == "categorical" and len(p["values"]) < 2:
                continue
            out.append(k)
        return out


def _coerce(v):
    """YAML 1.1 reads ``1e-4`` as a string; W&B users write it anyway. Turn numeric strings into numbers."""
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
        try:
            f = float(v)
            return f if math.isfinite(f) or v.lower() in ("inf", "-inf", "nan") else v
        except ValueError:
            return v
    if isinstance(v, list):
        return [_coerce(x) for x in v]
    return v


def flatten_parameters(params: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """W&B nested ``parameters:`` blocks -> ``{"a.b": spec}``; values coerced to numbers where numeric."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(params, Mapping):
        raise SweepSpecError(f"'parameters{'.' + prefix if prefix else ''}' must be a mapping")
    for name, spec in params.items():
        key = f"{prefix}{name}"
        if not isinstance(spec, Mapping):
            raise SweepSpecError(f"parameter {key!r}: expected a mapping with value/values/distribution, got {spec!r}")
        if "parameters" in spec:
            out.update(flatten_parameters(spec["parameters"], prefix=key + "."))
            continue
        spec = {k: _coerce(v) for k, v in spec.items()}
        _distribution(key, spec)  # validates
        out[key] = spec
    return out


def _distribution(name: str, p: Mapping[str, Any]) -> str:
    """The (inferred, as W&B does) distribution of one parameter spec; raises on bad specs."""
    d = p.get("distribution")
    if d is None:
        if "value" in p:
            d = "constant"
        elif "values" in p:
            d = "categorical"
        elif "min" in p and "max" in p:
            d = "int_uniform" if isinstance(p["min"], int) and isinstance(p["max"], int) else "uniform"
        else:
            raise SweepSpecError(f"parameter {name!r}: give value, values, or min/max (or a distribution)")
    if d not in DISTRIBUTIONS:
        raise SweepSpecError(f"parameter {name!r}: unknown distribution {d!r}; supported: {DISTRIBUTIONS}")
    if d == "categorical":
        vals = p.get("values")
        if not isinstance(vals, list) or not vals:
            raise SweepSpecError(f"parameter {name!r}: 'values' must be a non-empty list")
        probs = p.get("probabilities")
        if probs is not None and (len(probs) != len(vals) or abs(sum(probs) - 1) > 1e-6):
            raise SweepSpecError(f"parameter {name!r}: 'probabilities' must match 'values' and sum to 1")
    if d == "constant" and "value" not in p:
        raise SweepSpecError(f"parameter {name!r}: constant needs 'value'")
    if d in ("int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform_values"):
        if "min" not in p or "max" not in p:
            raise SweepSpecError(f"parameter {name!r}: distribution {d} needs min and max")
        if not float(p["min"]) <= float(p["max"]):
            raise SweepSpecError(f"parameter {name!r}: min > max")
        if d in ("log_uniform_values", "q_log_uniform_values") and float(p["min"]) <= 0:
            raise SweepSpecError(f"parameter {name!r}: {d} needs min > 0")
    return d


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Parse and validate a W&B sweep file. ``overrides`` (``key=value``) add/replace constant parameters."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepSpecError(f"cannot parse {path}: {e}") from None
    return sweep_from_dict(raw, path=path, overrides=overrides)


def sweep_from_dict(raw: Mapping[str, Any], path: Path | None = None, overrides: Sequence[str] = ()) -> SweepSpec:
    where = str(path) if path else "sweep"
    if not isinstance(raw, Mapping):
        raise SweepSpecError(f"{where}: must hold a mapping")
    method = raw.get("method")
    if method not in METHODS:
        hint = " (bayes needs the W&B server; use wandb sweep/agent)" if method == "bayes" else ""
        raise SweepSpecError(f"{where}: method must be one of {METHODS}, got {method!r}{hint}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, Mapping) or not metric.get("name"):
        raise SweepSpecError(f"{where}: needs metric: {{name: ..., goal: maximize|minimize}}")
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepSpecError(f"{where}: metric.goal must be maximize or minimize, got {goal!r}")
    params = flatten_parameters(raw.get("parameters") or {})
    for ov in overrides:
        if "=" not in ov:
            raise SweepSpecError(f"override {ov!r} is not key=value")
        k, v = ov.split("=", 1)
        params[k.strip()] = {"value": _coerce(yaml.safe_load(v) if v else v)}
    if not params:
        raise SweepSpecError(f"{where}: no parameters")
    if method == "grid":
        for k, p in params.items():
            if _distribution(k, p) not in ("constant", "categorical"):
                raise SweepSpecError(f"{where}: grid search needs value/values for every parameter; {k!r} is a distribution")
    command = raw.get("command")
    program = raw.get("program")
    if command is None:
        if program and Path(str(program)).name in ("train.py", "edit.py"):
            raise SweepSpecError(
                f"{where}: {program} takes key=value overrides; add\n  command: [${{env}}, ${{interpreter}}, "
                f"${{program}}, ${{args_no_hyphens}}]")
        command = list(DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise SweepSpecError(f"{where}: command must be a list of strings")
    if "${program}" in command and not program:
        raise SweepSpecError(f"{where}: command uses ${{program}} but no program is given")
    run_cap = raw.get("run_cap")
    name = raw.get("name") or (path.stem if path else "sweep")
    return SweepSpec(path=path, name=str(name), method=method, metric=str(metric["name"]), goal=goal,
                     parameters=params, program=program, command=list(command),
                     run_cap=int(run_cap) if run_cap is not None else None,
                     project=str(raw.get("project") or "massedit"), entity=raw.get("entity"), raw=dict(raw))


# ------------------------------------------------------------------------------------------ expansion
def expand_grid(parameters: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Cartesian product of every ``values`` list (``value`` = one-element list), in file order."""
    names = list(parameters)
    lists = []
    for k in names:
        p = parameters[k]
        d = _distribution(k, p)
        if d == "constant":
            lists.append([p["value"]])
        elif d == "categorical":
            lists.append(list(p["values"]))
        else:
            raise SweepSpecError(f"grid search cannot enumerate distribution {d!r} of {k!r}")
    return [dict(zip(names, combo)) for combo in itertools.product(*lists)]


def sample_value(name: str, p: Mapping[str, Any], rng: random.Random):
    """One draw from a parameter spec (W&B semantics; ``log_uniform`` min/max are natural logs)."""
    d = _distribution(name, p)
    if d == "constant":
        return p["value"]
    if d == "categorical":
        vals = p["values"]
        probs = p.get("probabilities")
        return rng.choices(vals, weights=probs)[0] if probs else rng.choice(vals)
    lo, hi = p.get("min"), p.get("max")
    q = float(p.get("q", 1))
    if d == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if d == "uniform":
        return rng.uniform(float(lo), float(hi))
    if d == "q_uniform":
        return round(rng.uniform(float(lo), float(hi)) / q) * q
    if d == "log_uniform":
        return math.exp(rng.uniform(float(lo), float(hi)))
    if d == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi))))
    if d == "q_log_uniform_values":
        return round(math.exp(rng.uniform(math.log(float(lo)), math.log(float(hi)))) / q) * q
    mu, sigma = float(p.get("mu", 0.0)), float(p.get("sigma", 1.0))
    if d == "normal":
        return rng.gauss(mu, sigma)
    if d == "q_normal":
        return round(rng.gauss(mu, sigma) / q) * q
    if d == "log_normal":
        return math.exp(rng.gauss(mu, sigma))
    raise SweepSpecError(f"unsupported distribution {d!r}")  # pragma: no cover


def sample_random(parameters: Mapping[str, Mapping[str, Any]], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` random configurations; the first k of ``count`` equal those of ``k`` (resumable)."""
    rng = random.Random(seed)
    return [{k: sample_value(k, p, rng) for k, p in parameters.items()} for _ in range(int(count))]


def expand_trials(spec: SweepSpec, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trial configurations of a sweep: the whole grid (cut to ``count``/``run_cap``) or random draws."""
    cap = count if count is not None else spec.run_cap
    if spec.method == "grid":
        trials = expand_grid(spec.parameters)
        return trials[:cap] if cap else trials
    if not cap:
        raise SweepSpecError("random search needs a number of trials: run_cap in the file or --count")
    return sample_random(spec.parameters, cap, seed=seed)


# ------------------------------------------------------------------------------------------ commands
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def format_args(params: Mapping[str, Any], style: str = "args_no_hyphens") -> list[str]:
    """Trial parameters as program arguments, as the W&B agent writes them for each macro."""
    if style == "args_no_hyphens":
        return [f"{k}={_fmt(v)}" for k, v in params.items()]
    if style == "args":
        return [f"--{k}={_fmt(v)}" for k, v in params.items()]
    if style == "args_no_boolean_flags":
        out = []
        for k, v in params.items():
            if v is True:
                out.append(f"--{k}")
            elif v is not False:
                out.append(f"--{k}={_fmt(v)}")
        return out
    if style == "args_json":
        return [json.dumps(dict(params))]
    raise ValueError(style)


def build_command(spec: SweepSpec, params: Mapping[str, Any], extra_args: Sequence[str] = (),
                  interpreter: str | None = None) -> list[str]:
    """Expand the sweep's ``command`` macros for one trial (``extra_args`` follow the trial's arguments)."""
    out: list[str] = []
    for item in spec.command:
        if item == "${env}":
            if os.name != "nt":
                out.append("/usr/bin/env")
        elif item == "${interpreter}":
            out.append(interpreter or sys.executable)
        elif item == "${program}":
            out.append(str(spec.program))
        elif item in ("${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}"):
            out.extend(format_args(params, item[2:-1]))
            if item != "${args_json}":
                out.extend(extra_args)
        elif item == "${project}":
            out.append(spec.project)
        elif item == "${entity}":
            out.append(spec.entity or "")
        else:
            out.append(item)
    return out


# ------------------------------------------------------------------------------------------ state
class SweepState:
    """The on-disk state of a sweep (``sweep_state.json``), rewritten atomically after every change."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = Path(path)
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def open(cls, out_dir: Path, spec: SweepSpec, trials: list[dict[str, Any]], fingerprint: str,
             retry_failed: bool = False) -> "SweepState":
        path = Path(out_dir) / STATE_FILE
        if path.exists():
            data = load_json(path)
            if data.get("fingerprint") != fingerprint:
                raise SweepSpecError(
                    f"{out_dir} holds a different sweep (parameters/command changed); choose another --out "
                    "or delete it to start over")
            known = {stable_hash(t["params"]): t for t in data["trials"]}
            for t in data["trials"]:
                if t["status"] == "running" or (retry_failed and t["status"] == "failed"):
                    t["status"] = "pending"  # interrupted (or retried): run again
            for params in trials:  # a larger --count adds trials; existing ones keep their state
                if stable_hash(params) not in known:
                    data["trials"].append(_new_trial(len(data["trials"]), params))
        else:
            data = {"name": spec.name, "fingerprint": fingerprint, "sweep_file": str(spec.path) if spec.path else None,
                    "method": spec.method, "metric": spec.metric, "goal": spec.goal,
                    "group": f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    "trials": [_new_trial(i, p) for i, p in enumerate(trials)]}
        st = cls(path, data)
        st.save()
        return st

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.data["trials"]

    def update(self, trial_id: str, **fields) -> None:
        with self._lock:
            for t in self.trials:
                if t["id"] == trial_id:
                    t.update(fields)
            self.save()


def _new_trial(i: int, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": f"t{i:03d}", "params": dict(params), "status": "pending", "result": None,
            "seconds": None, "error": None}


# ------------------------------------------------------------------------------------------ running
@dataclass
class TrialContext:
    spec: SweepSpec
    trial: dict[str, Any]
    trial_dir: Path
    group: str
    device: str | None = None
    extra_args: tuple[str, ...] = ()


TrialFn = Callable[[TrialContext], Mapping[str, Any]]


def get_path(d: Mapping[str, Any] | None, dotted: str):
    """``d["a"]["b"]`` for ``"a.b"`` (or the flat key ``"a.b"`` when present); None if missing."""
    if d is None:
        return None
    if dotted in d:
        return d[dotted]
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def subprocess_trial(ctx: TrialContext) -> dict[str, Any]:
    """Run the sweep's command for one trial (what ``wandb agent`` would run) and read its results.

    The program reports through ``MASSEDIT_TRIAL_RESULT`` (a JSON file; ``train.py`` writes its results
    there). For massedit programs (``train.py``/``edit.py``) the runner also sets the run directory and
    the W&B group/name through config overrides; other programs get them as ``WANDB_RUN_GROUP`` /
    ``WANDB_NAME``.
    """
    spec = ctx.spec
    result_file = ctx.trial_dir / "result.json"
    if result_file.exists():
        result_file.unlink()
    extra = list(ctx.extra_args)
    massedit_program = spec.program is not None and Path(str(spec.program)).name in ("train.py", "edit.py")
    if massedit_program:
        # overwrite=true: a trial that runs again (resumed sweep, retry_failed) replaces its own unfinished run
        extra += [f"output_dir={ctx.trial_dir / 'run'}", "overwrite=true", f"logger.group={ctx.group}",
                  f"logger.name={spec.name}-{ctx.trial['id']}"]
    cmd = build_command(spec, ctx.trial["params"], extra_args=extra)
    env = dict(os.environ)
    env.update({"MASSEDIT_TRIAL_RESULT": str(result_file), "WANDB_RUN_GROUP": ctx.group,
                "WANDB_NAME": f"{spec.name}-{ctx.trial['id']}", "WANDB_SILENT": "true"})
    if ctx.device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(ctx.device)
    ctx.trial_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.trial_dir / "command.txt", shlex.join(cmd) + "\n")
    log.info("[%s] %s", ctx.trial["id"], shlex.join(cmd))
    with open(ctx.trial_dir / "trial.log", "w") as fh:  # live log (not a result file)
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (ctx.trial_dir / "trial.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"trial {ctx.trial['id']} exited with {proc.returncode}; log tail:\n{tail}")
    if not result_file.exists():
        raise RuntimeError(f"trial {ctx.trial['id']} wrote no results to MASSEDIT_TRIAL_RESULT ({result_file})")
    return load_json(result_file)


def run_sweep(spec: SweepSpec, out_dir: str | Path, trial_fn: TrialFn | None = None, *, count: int | None = None,
              seed: int = 0, devices: Sequence[str] | None = None, extra_args: Sequence[str] = (),
              retry_failed: bool = False, log_to_wandb: bool = True, x_param: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary (see :func:`summarize`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = expand_trials(spec, count=count, seed=seed)
    state = SweepState.open(out_dir, spec, trials, spec.fingerprint(extra_args), retry_failed=retry_failed)
    trial_fn = trial_fn or subprocess_trial
    todo = [t for t in state.trials if t["status"] == "pending"]
    done = [t for t in state.trials if t["status"] == "finished"]
    log.info("sweep %s: %d trials, %d finished, %d to run -> %s", spec.name, len(state.trials), len(done), len(todo), out_dir)

    bar = _progress(len(todo)) if progress and todo else None

    def run_one(trial, device=None):
        ctx = TrialContext(spec=spec, trial=trial, trial_dir=out_dir / "trials" / trial["id"], group=state.data["group"],
                           device=device, extra_args=tuple(extra_args))
        state.update(trial["id"], status="running", device=device)
        t0 = time.time()
        try:
            result = dict(trial_fn(ctx))
            state.update(trial["id"], status="finished", result=_jsonable(result), seconds=time.time() - t0, error=None)
            log.info("[%s] %s -> %s=%s (%.0f s)", trial["id"], {k: trial["params"].get(k) for k in spec.varying()}, spec.metric,
                     get_path(result, spec.metric), time.time() - t0)
        except KeyboardInterrupt:
            state.update(trial["id"], status="pending")
            raise
        except Exception as e:  # one failing trial must not kill the sweep
            state.update(trial["id"], status="failed", error=str(e)[-4000:], seconds=time.time() - t0)
            log.error("[%s] failed: %s", trial["id"], str(e)[-500:])
        if bar is not None:
            bar.update(1)

    try:
        if devices and len(devices) > 1:
            free = list(devices)
            lock = threading.Lock()

            def worker(trial):
                with lock:
                    dev = free.pop(0)
                try:
                    run_one(trial, dev)
                finally:
                    with lock:
                        free.append(dev)

            with ThreadPoolExecutor(max_workers=len(devices)) as pool:
                list(pool.map(worker, todo))
        else:
            dev = devices[0] if devices else None
            for t in todo:
                run_one(t, dev)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(spec, state.data, x_param=x_param)
    write_summary(out_dir, spec, summary)
    if log_to_wandb:
        log_summary_to_wandb(out_dir, spec, summary, group=state.data["group"])
    return summary


def _progress(n: int):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=n, desc="sweep trials", unit="trial")
    except ImportError:  # pragma: no cover
        return None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ------------------------------------------------------------------------------------------ summary
def _as_float(v):
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def summarize(spec: SweepSpec, state: Mapping[str, Any], x_param: str | None = None) -> dict[str, Any]:
    """Rows (one per trial: parameters, efficacy/paraphrase/neighbourhood success, Score, the sweep metric)
    and the best finished trial by the sweep's metric and goal."""
    varying = spec.varying()
    x = x_param or (varying[0] if varying else None)
    rows = []
    for t in state["trials"]:
        r = t.get("result") or {}
        row = {"trial": t["id"], "status": t["status"], **{k: t["params"].get(k) for k in varying}}
        for c in SUMMARY_COLUMNS:
            row[c] = _as_float(get_path(r, c))
        row["metric"] = _as_float(get_path(r, spec.metric))
        row["delta_norm"] = _as_float(get_path(r, "delta_norm"))
        row["seconds"] = t.get("seconds")
        rows.append(row)
    finished = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    pre = None  # the unedited model's numbers, when the trials report them (train.py: result["pre"])
    for t in state["trials"]:
        p = (t.get("result") or {}).get("pre") if t["status"] == "finished" else None
        if isinstance(p, Mapping):
            pre = {c: _as_float(p.get(c)) for c in SUMMARY_COLUMNS}
            break
    best = None
    if finished:
        key = (lambda r: r["metric"]) if spec.goal == "maximize" else (lambda r: -r["metric"])
        best = max(finished, key=key)
    return {"name": spec.name, "metric": spec.metric, "goal": spec.goal, "x": x, "varying": varying, "rows": rows,
            "best": best, "pre": pre, "group": state.get("group"), "n_finished": len(finished), "n_trials": len(rows),
            "n_failed": sum(r["status"] == "failed" for r in rows)}


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.2f}"
    return str(v)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    cols = ["trial", *summary["varying"], *SUMMARY_COLUMNS, "delta_norm", "status"]
    if summary["metric"] not in SUMMARY_COLUMNS:
        cols.insert(-2, "metric")
    best = summary["best"]["trial"] if summary["best"] else None
    lines = [f"Sweep `{summary['name']}`: {summary['n_finished']}/{summary['n_trials']} trials finished"
             f" ({summary['n_failed']} failed); metric `{summary['metric']}` ({summary['goal']}).", ""]
    if summary.get("pre") and any(v is not None for v in summary["pre"].values()):
        lines += ["Unedited model: " + ", ".join(f"{c} {_cell(v)}" for c, v in summary["pre"].items()), ""]
    lines += ["| " + " | ".join(c if c != "metric" else summary["metric"] for c in cols) + " |",
              "|" + "|".join("---" for _ in cols) + "|"]
    for r in summary["rows"]:
        cells = [_cell(r.get(c)) for c in cols]
        if r["trial"] == best:
            cells = [f"**{c}**" for c in cells]
            cells[0] += " (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[str, Any], path: str | Path) -> Path | None:
    """Efficacy, paraphrase (generalisation), neighbourhood (specificity) and Score vs the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from massedit.core.io import atomic_path

    x = summary["x"]
    rows = [r for r in summary["rows"] if r["status"] == "finished"]
    if not rows:
        return None
    xs_raw = [r.get(x) if x else i for i, r in enumerate(rows)]
    numeric = all(_as_float(v) is not None for v in xs_raw)
    if numeric:
        order = sorted(range(len(rows)), key=lambda i: float(xs_raw[i]))
        xs = [float(xs_raw[i]) for i in order]
    else:
        order = list(range(len(rows)))
        xs = list(range(len(rows)))
    rows = [rows[i] for i in order]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = {"efficacy_success": "Efficacy (ES)", "paraphrase_success": "Generalisation (PS)",
              "neighborhood_success": "Specificity (NS)", "score": "Score"}
    styles = {"efficacy_success": "o-", "paraphrase_success": "s-", "neighborhood_success": "^-", "score": "D-"}
    colors = {"efficacy_success": "C0", "paraphrase_success": "C1", "neighborhood_success": "C2", "score": "C3"}
    pre = summary.get("pre") or {}
    for c in SUMMARY_COLUMNS:
        ys = [r.get(c) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], styles[c], label=labels[c],
                    lw=2.5 if c == "score" else 1.5, color=colors[c])
        if pre.get(c) is not None:
            ax.axhline(pre[c], color=colors[c], ls="--", lw=0.8, alpha=0.5)
    if any(v is not None for v in pre.values()):
        ax.plot([], [], "k--", lw=0.8, alpha=0.5, label="unedited model (dashed)")
    if summary["metric"] not in SUMMARY_COLUMNS:
        ax.plot(xs, [r.get("metric") for r in rows], "k--", label=summary["metric"])
    best = summary.get("best")
    if best is not None:
        bi = next(i for i, r in enumerate(rows) if r["trial"] == best["trial"])
        by = best.get("score") if best.get("score") is not None else best.get("metric")
        ax.axvline(xs[bi], color="gray", ls=":", lw=1)
        ax.plot([xs[bi]], [by], marker="*", ms=18, color="gold", mec="black", zorder=5,
                label=f"best {summary['metric']} ({_cell(best.get('metric'))})")
    if numeric:
        pos = [v for v in xs if v > 0]
        if pos and max(pos) / min(pos) >= 100:
            if min(xs) <= 0:
                ax.set_xscale("symlog", linthresh=min(pos))
            else:
                ax.set_xscale("log")
    else:
        ax.set_xticks(xs, [str(v) for v in (xs_raw[i] for i in order)], rotation=30)
    ax.set_xlabel(x or "trial")
    ax.set_ylabel("%")
    ax.set_title(f"Sweep {summary['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_summary(out_dir: str | Path, spec: SweepSpec, summary: Mapping[str, Any]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": atomic_write_json(out_dir / "summary.json", summary),
             "md": atomic_write_text(out_dir / "summary.md", summary_markdown(summary))}
    png = plot_summary(summary, out_dir / "sweep.png")
    if png is not None:
        paths["png"] = png
    return paths


def log_summary_to_wandb(out_dir: Path, spec: SweepSpec, summary: Mapping[str, Any], group: str | None) -> bool:
    """Log the summary table and plot as a W&B run (``job_type=sweep-summary``) in the sweep's group."""
    try:
        import wandb

        from massedit.tasks.runs import resolve_wandb_mode
    except ImportError:
        log.warning("wandb not installed; summary not logged to W&B")
        return False
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=spec.project, entity=spec.entity, group=group, name=f"{spec.name}-summary",
                         job_type="sweep-summary", dir=str(out_dir), mode=resolve_wandb_mode("auto"),
                         config={"sweep": spec.raw}, reinit="finish_previous")
        cols = ["trial", *summary["varying"], *SUMMARY_COLUMNS, "delta_norm", "status"]
        table = wandb.Table(columns=cols, data=[[_table_value(r.get(c)) for c in cols] for r in summary["rows"]])
        payload = {"sweep_summary": table}
        png = Path(out_dir) / "sweep.png"
        if png.exists():
            payload["sweep_plot"] = wandb.Image(str(png))
        run.log(payload)
        if summary["best"]:
            run.summary["best_trial"] = summary["best"]["trial"]
            run.summary[f"best_{spec.metric}"] = summary["best"]["metric"]
        run.finish()
        return True
    except Exception as e:  # logging must not lose a finished sweep
        log.warning("could not log the sweep summary to W&B: %s", e)
        return False


def _table_value(v):
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="massedit sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file", help="W&B sweep YAML, e.g. configs/sweeps/ftw_weight_decay.yaml")
    ap.add_argument("--out", help="output dir (default outputs/sweeps/<name>); rerun with the same --out to resume")
    ap.add_argument("--count", type=int, help="number of trials (random search; caps a grid)")
    ap.add_argument("--seed", type=int, default=0, help="random-search seed")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a parameter for every trial (adds/replaces a constant parameter)")
    ap.add_argument("--extra", action="append", default=[], metavar="ARG",
                    help="extra argument appended to every trial's command")
    ap.add_argument("--devices", help="comma-separated CUDA devices: one trial per device in parallel")
    ap.add_argument("--retry-failed", action="store_true", help="rerun failed trials when resuming")
    ap.add_argument("--x", dest="x_param", help="parameter on the plot's x axis (default: first varying one)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log the summary run to W&B")
    ap.add_argument("--dry-run", action="store_true", help="print the trials' commands and exit")
    args = ap.parse_args(argv)
    from massedit.tasks.runs import configure_logging

    configure_logging("INFO")
    try:
        spec = load_sweep(args.sweep_file, overrides=args.sets)
        trials = expand_trials(spec, count=args.count, seed=args.seed)
    except (SweepSpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for i, t in enumerate(trials):
            print(f"t{i:03d}: {shlex.join(build_command(spec, t, extra_args=args.extra))}")
        return 0
    out = Path(args.out or Path("outputs") / "sweeps" / spec.name)
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    try:
        summary = run_sweep(spec, out, count=args.count, seed=args.seed, devices=devices, extra_args=args.extra,
                            retry_failed=args.retry_failed, log_to_wandb=not args.no_wandb, x_param=args.x_param)
    except SweepSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    if summary["best"]:
        b = summary["best"]
        print(f"best trial {b['trial']}: {spec.metric}={_cell(b['metric'])} with "
              f"{ {k: b.get(k) for k in summary['varying']} }")
    print(f"summary: {out / 'summary.md'}, {out / 'summary.json'}, plot: {out / 'sweep.png'}")
    return 0 if summary["n_failed"] == 0 else 1
