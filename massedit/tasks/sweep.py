"""Offline runner for W&B sweep files (``configs/sweeps/*.yaml``) on Optuna: grid, random and TPE search, resumable.

The same YAML file runs two ways:

* with a W&B server: ``wandb sweep configs/sweeps/ftw_weight_decay.yaml`` then ``wandb agent <id>`` (the agent runs
  the file's ``command``, e.g. ``python train.py method.weight_decay=0.001 ...``; massedit logs its config flat
  with dotted keys, so the agent's parameters sit beside it);
* offline: ``massedit sweep configs/sweeps/ftw_weight_decay.yaml`` runs the same parameters as an Optuna study
  (``method: grid`` -> ``GridSampler``, ``random`` -> ``RandomSampler``, ``bayes`` -> ``TPESampler``) whose trials
  execute the file's ``command`` exactly as the agent would (``MASSEDIT_TRIAL_RESULT`` carries the numbers back).
  The study lives in ``<out>/optuna.journal`` (Optuna's journal storage, append-only): an interrupted sweep resumes
  without rerunning finished trials; ``--devices 0,1`` runs one trial per device. At the end it writes
  ``summary.md``, ``summary.json`` and ``sweep.png`` (ES/PS/NS/Score with 95% CIs against the swept value, best
  marked) and logs them to W&B.

Sweep keys: ``name, program, method (grid|random|bayes), metric {name, goal}, parameters, command, run_cap,
project, entity``. Parameters: ``value``, ``values``, ``distribution`` (``constant, categorical, int_uniform,
uniform, q_uniform, log_uniform, log_uniform_values, q_log_uniform_values``) with ``min/max/q``; nested
``parameters`` blocks are flattened to dotted names (``method.weight_decay``). Metric names are the logged ones
(``eval/post/score``); a trial's ``results.json`` holds them as ``eval.post.score``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from massedit.core.io import atomic_write_text, load_json, stable_hash
from massedit.core.errors import InputError

from massedit.tasks.sweep_report import (SUMMARY_COLUMNS, _as_float, _cell, log_summary_to_wandb,  # noqa: F401
                                         plot_summary, summary_markdown, write_summary)  # (re-exported)

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values")
UNSUPPORTED = ("normal", "q_normal", "log_normal", "q_log_uniform", "beta", "q_beta", "inv_log_uniform",
               "inv_log_uniform_values")
DEFAULT_METRIC = "eval/post/score"
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
    if d in UNSUPPORTED:
        raise SweepSpecError(f"parameter {name!r}: distribution {d!r} runs on the W&B server only (wandb agent); the "
                             f"offline runner (Optuna) takes {DISTRIBUTIONS}")
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
        raise SweepSpecError(f"{where}: method must be one of {METHODS}, got {method!r}")
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


MASSEDIT_PROGRAMS = ("edit.py", "train.py", "stats.py")


def program_argv(program) -> list[str]:
    """The program as the agent would start it; massedit's ``edit.py``/``train.py`` outside a checkout (a pip
    install has no such file) run as ``-m massedit edit``/``train``."""
    p = Path(str(program))
    if p.name in MASSEDIT_PROGRAMS and not p.exists():
        return ["-m", "massedit", p.stem]
    return [str(program)]


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
            out.extend(program_argv(spec.program))
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


# ------------------------------------------------------------------------------------------ running
@dataclass
class TrialContext:
    """One trial: ``trial`` = ``{"id": "t003", "number": 3, "params": {...}}`` (every parameter, constants too)."""

    spec: SweepSpec
    trial: dict[str, Any]
    trial_dir: Path
    group: str
    device: str | None = None
    extra_args: tuple[str, ...] = ()


TrialFn = Callable[[TrialContext], Mapping[str, Any]]


def get_path(d: Mapping[str, Any] | None, dotted: str):
    """``d["a"]["b"]`` for ``"a.b"`` or ``"a/b"`` (or the flat key when present); None if missing."""
    if d is None:
        return None
    if dotted in d:
        return d[dotted]
    cur: Any = d
    for part in dotted.replace("/", ".").split("."):  # eval/post/score -> d["eval"]["post"]["score"]
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
    massedit_program = spec.program is not None and Path(str(spec.program)).name in MASSEDIT_PROGRAMS
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


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ------------------------------------------------------------------------------------------ Optuna
def _optuna():
    try:
        import optuna
    except ImportError:
        raise SweepSpecError("the offline sweep runner needs Optuna: pip install 'massedit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


_PRIMITIVE = (type(None), bool, int, float, str)


def _encode(v):
    """Optuna's categorical choices are primitives; lists/dicts (``method.layers``) travel as ``json:...``."""
    return v if isinstance(v, _PRIMITIVE) else "json:" + json.dumps(v)


def _decode(v):
    return json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the ``values`` lists (``value`` = one value), in file order (first parameter slowest)."""
    points: list[dict[str, Any]] = [{}]
    for k, p in spec.parameters.items():
        d = _distribution(k, p)
        if d not in ("constant", "categorical"):
            raise SweepSpecError(f"grid search cannot enumerate distribution {d!r} of {k!r}")
        vals = [p["value"]] if d == "constant" else list(p["values"])
        points = [{**pt, k: v} for pt in points for v in vals]
    return points


def suggest(trial, name: str, p: Mapping[str, Any]):
    """One parameter of an Optuna trial from a W&B parameter spec (``log_uniform``: min/max are natural logs)."""
    d = _distribution(name, p)
    if d == "constant":
        return p["value"]
    if d == "categorical":
        if p.get("probabilities") is not None:
            raise SweepSpecError(f"parameter {name!r}: 'probabilities' runs on the W&B server only (wandb agent)")
        return _decode(trial.suggest_categorical(name, [_encode(x) for x in p["values"]]))
    lo, hi, q = p["min"], p["max"], p.get("q")
    if d == "int_uniform":
        return trial.suggest_int(name, int(lo), int(hi))
    if d == "uniform":
        return trial.suggest_float(name, float(lo), float(hi))
    if d == "q_uniform":
        return trial.suggest_float(name, float(lo), float(hi), step=float(q or 1))
    if d == "log_uniform":
        return trial.suggest_float(name, math.exp(float(lo)), math.exp(float(hi)), log=True)
    if d == "log_uniform_values":
        return trial.suggest_float(name, float(lo), float(hi), log=True)
    if d == "q_log_uniform_values":
        qq = float(q or 1)
        return round(trial.suggest_float(name, float(lo), float(hi), log=True) / qq) * qq
    raise SweepSpecError(f"unsupported distribution {d!r}")  # pragma: no cover


def make_sampler(spec: SweepSpec, seed: int = 0):
    """``grid`` -> GridSampler over the ``values`` lists, ``random`` -> RandomSampler, ``bayes`` -> TPESampler."""
    optuna = _optuna()
    if spec.method == "grid":
        space = {k: [_encode(x) for x in p["values"]] for k, p in spec.parameters.items()
                 if _distribution(k, p) == "categorical"}
        return optuna.samplers.GridSampler(space or {"_": [0]}, seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _params_key(params: Mapping[str, Any]) -> str:
    return stable_hash({k: _encode(v) for k, v in sorted(params.items())})


def _trial_params(spec: SweepSpec, t) -> dict[str, Any]:
    """All parameters of a stored trial (constants included), decoded."""
    out = {}
    given = {**t.system_attrs.get("fixed_params", {}), **t.params}  # an enqueued trial killed before it sampled
    for k, p in spec.parameters.items():
        if _distribution(k, p) == "constant":
            out[k] = p["value"]
        elif k in given:
            v = given[k]
            q = p.get("q")
            out[k] = round(v / float(q)) * float(q) if _distribution(k, p) == "q_log_uniform_values" and q else _decode(v)
    return out


def _fixed(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled (non-constant) part of ``params``, encoded, for ``study.enqueue_trial``."""
    return {k: _encode(v) for k, v in params.items() if k in spec.parameters
            and _distribution(k, spec.parameters[k]) != "constant"}


class SweepStudy:
    """A sweep as an Optuna study in ``<out>/optuna.journal`` (journal storage: append-only, resumable)."""

    def __init__(self, spec: SweepSpec, out_dir: Path, fingerprint: str, seed: int = 0):
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.spec, self.out_dir = spec, Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.storage = JournalStorage(JournalFileBackend(str(self.out_dir / JOURNAL)))
        names = [s.study_name for s in optuna.get_all_study_summaries(self.storage)]
        if names and spec.name not in names:
            raise SweepSpecError(f"{out_dir} holds a different sweep ({names}); choose another --out")
        direction = "maximize" if spec.goal == "maximize" else "minimize"
        study = optuna.create_study(study_name=spec.name, storage=self.storage, direction=direction,
                                    load_if_exists=True)
        n_before = len(study.trials)
        self.study = optuna.load_study(study_name=spec.name, storage=self.storage,
                                       sampler=make_sampler(spec, seed + n_before))  # resumed draws differ
        attrs = self.study.user_attrs
        if "fingerprint" not in attrs:
            self.study.set_user_attr("fingerprint", fingerprint)
            self.study.set_user_attr("group", f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.study.set_user_attr("sweep_file", str(spec.path) if spec.path else None)
            self.study.set_user_attr("requeued", [])
        elif attrs["fingerprint"] != fingerprint:
            raise SweepSpecError(f"{out_dir} holds a different sweep (parameters/command changed); choose another "
                                 "--out or delete it to start over")

    @property
    def group(self) -> str:
        return self.study.user_attrs["group"]

    def trials(self):
        return self.study.get_trials(deepcopy=False)

    def _requeue(self, trials) -> int:
        done = set(self.study.user_attrs.get("requeued", []))
        n = 0
        for t in trials:
            if t.number in done:
                continue
            self.study.enqueue_trial(_fixed(self.spec, _trial_params(self.spec, t)), skip_if_exists=False)
            done.add(t.number)
            n += 1
        self.study.set_user_attr("requeued", sorted(done))
        return n

    def prepare(self, count: int | None, retry_failed: bool) -> int:
        """Queue what is left to run; returns the number of trials to run now. Trials a killed runner left
        ``RUNNING`` (or that were interrupted) run again; with ``retry_failed`` so do failed ones."""
        from optuna.trial import TrialState

        st = self.storage
        for t in self.trials():
            if t.state == TrialState.RUNNING:  # the runner that owned it is gone (one runner per --out)
                st.set_trial_user_attr(t._trial_id, "interrupted", True)
                st.set_trial_state_values(t._trial_id, TrialState.FAIL)
        trials = self.trials()
        interrupted = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
        failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
        self._requeue(interrupted)
        if retry_failed:
            self._requeue(failed)
        cap = count if count is not None else self.spec.run_cap
        if self.spec.method == "grid":
            if not any(t.user_attrs.get("grid") for t in trials):  # first run: the whole grid, in file order
                points = grid_points(self.spec)
                for pt in points[:cap] if cap else points:
                    self.study.enqueue_trial(_fixed(self.spec, pt), user_attrs={"grid": True})
            return sum(t.state == TrialState.WAITING for t in self.trials())
        if not cap:
            raise SweepSpecError(f"{self.spec.method} search needs a number of trials: run_cap in the file or --count")
        trials = self.trials()
        superseded = set(self.study.user_attrs.get("requeued", []))
        counted = sum(t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in superseded)
                      for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return max(waiting, int(cap) - counted)


def run_sweep(spec: SweepSpec, out_dir: str | Path, trial_fn: TrialFn | None = None, *, count: int | None = None,
              seed: int = 0, devices: Sequence[str] | None = None, extra_args: Sequence[str] = (),
              retry_failed: bool = False, log_to_wandb: bool = True, x_param: str | None = None,
              progress: bool = True, logx: bool | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep on Optuna; returns the summary (see :func:`summarize`)."""
    out_dir = Path(out_dir)
    study = SweepStudy(spec, out_dir, spec.fingerprint(extra_args), seed=seed)
    n_todo = study.prepare(count, retry_failed)
    trial_fn = trial_fn or subprocess_trial
    free: queue.Queue = queue.Queue()
    for d in (devices or [None]):
        free.put(d)
    n_done = sum(t.state.name == "COMPLETE" for t in study.trials())
    log.info("sweep %s (%s, Optuna): %d finished, %d to run -> %s", spec.name, spec.method, n_done, n_todo, out_dir)
    bar = _progress(n_todo, "sweep trials") if progress and n_todo else None

    def objective(trial) -> float:
        params = {k: suggest(trial, k, p) for k, p in spec.parameters.items()}
        tid = f"t{trial.number:03d}"
        device = free.get()
        ctx = TrialContext(spec=spec, trial={"id": tid, "number": trial.number, "params": params},
                           trial_dir=out_dir / "trials" / tid, group=study.group, device=device,
                           extra_args=tuple(extra_args))
        trial.set_user_attr("device", device)
        t0 = time.time()
        try:
            result = dict(trial_fn(ctx))
            trial.set_user_attr("result", _jsonable(result))
            value = _as_float(get_path(result, spec.metric))
            if value is None:
                raise RuntimeError(f"trial {tid} reported no number for the sweep metric {spec.metric!r}")
            log.info("[%s] %s -> %s=%s (%.0f s)", tid, {k: params.get(k) for k in spec.varying()}, spec.metric,
                     _cell(value), time.time() - t0)
            return value
        except Exception as e:  # recorded as a failed trial; the sweep goes on
            trial.set_user_attr("error", str(e)[-4000:])
            log.error("[%s] failed: %s", tid, str(e)[-500:])
            raise
        except BaseException:  # the runner itself is stopped: the trial runs again on resume
            trial.set_user_attr("interrupted", True)
            raise
        finally:
            trial.set_user_attr("seconds", time.time() - t0)
            free.put(device)
            if bar is not None:
                bar.update(1)

    try:
        if n_todo:
            study.study.optimize(objective, n_trials=n_todo, n_jobs=max(1, len(devices or [])), catch=(Exception,),
                                 gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(spec, study, x_param=x_param)
    write_summary(out_dir, spec, summary, logx=logx)
    if log_to_wandb:
        log_summary_to_wandb(out_dir, spec, summary, group=study.group)
    return summary


def report_sweep(spec: SweepSpec, out_dir: str | Path, *, extra_args: Sequence[str] = (), x_param: str | None = None,
                 logx: bool | None = None, log_to_wandb: bool = False) -> dict[str, Any]:
    """Summary and plot of the trials finished so far in ``out_dir`` (runs nothing)."""
    if not (Path(out_dir) / JOURNAL).exists():
        raise SweepSpecError(f"no sweep in {out_dir} ({JOURNAL} missing)")
    study = SweepStudy(spec, Path(out_dir), spec.fingerprint(extra_args))
    summary = summarize(spec, study, x_param=x_param)
    write_summary(out_dir, spec, summary, logx=logx)
    if log_to_wandb:
        log_summary_to_wandb(Path(out_dir), spec, summary, group=study.group)
    return summary


def _progress(n: int, desc: str):
    from massedit.core.progress import progress_bar

    return progress_bar(n, desc, unit="trial")


# ------------------------------------------------------------------------------------------ summary
def _stage_value(result: Mapping[str, Any], stage: str, name: str):
    """A trial's ``eval/{stage}/{name}`` (massedit's results.json), else a top-level ``name`` (other programs)."""
    v = get_path(result, f"eval/{stage}/{name}")
    if v is None and stage == "post":
        v = get_path(result, name)
    if v is None and stage == "pre":
        v = get_path(result, f"pre.{name}")
    return _as_float(v)


def trial_records(spec: SweepSpec, study) -> list[dict[str, Any]]:
    """One record per parameter set (its latest attempt: a re-run supersedes an interrupted or failed one):
    ``{"id", "number", "params", "status" (finished|failed|running), "result", "seconds", "error", "device"}``."""
    status = {"COMPLETE": "finished", "FAIL": "failed", "RUNNING": "running", "PRUNED": "failed"}
    latest: dict[str, dict[str, Any]] = {}
    for t in study.trials():
        if t.state.name == "WAITING":
            continue
        params = _trial_params(spec, t)
        rec = {"id": f"t{t.number:03d}", "number": t.number, "params": params, "status": status[t.state.name],
               "result": t.user_attrs.get("result"), "seconds": t.user_attrs.get("seconds"),
               "error": t.user_attrs.get("error"), "device": t.user_attrs.get("device"),
               "interrupted": bool(t.user_attrs.get("interrupted"))}
        key = _params_key(params)
        prev = latest.get(key)
        if prev is None or rec["number"] > prev["number"] or (prev["interrupted"] and not rec["interrupted"]):
            latest[key] = rec
    return sorted(latest.values(), key=lambda r: r["number"])


def summarize(spec: SweepSpec, study, x_param: str | None = None) -> dict[str, Any]:
    """Rows (one per parameter set: parameters, ES/PS/NS/Score and their 95% CIs after the edit, the sweep metric)
    and the best finished trial by the sweep's metric and goal."""
    varying = spec.varying()
    x = x_param or (varying[0] if varying else None)
    records = trial_records(spec, study)
    rows = []
    for t in records:
        r = t.get("result") or {}
        row = {"trial": t["id"], "status": t["status"], **{k: t["params"].get(k) for k in varying}}
        for c in SUMMARY_COLUMNS:
            row[c] = _stage_value(r, "post", c)
            row[f"{c}_ci"] = _stage_value(r, "post", f"{c}_ci")
            row[f"pre_{c}"] = _stage_value(r, "pre", c)  # the unedited model on this trial's requests
        row["metric"] = _as_float(get_path(r, spec.metric))
        norms = get_path(r, "delta_norms")
        row["delta_norm"] = (_as_float(math.sqrt(sum(float(v) ** 2 for v in norms.values())))
                             if isinstance(norms, Mapping) and norms else _as_float(get_path(r, "delta_norm")))
        row["seconds"] = t.get("seconds")
        row["error"] = t.get("error")
        rows.append(row)
    finished = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    pre = None  # the unedited model's numbers, when the trials report them
    for t in records:
        r = t.get("result") or {}
        if t["status"] == "finished" and any(_stage_value(r, "pre", c) is not None for c in SUMMARY_COLUMNS):
            pre = {c: _stage_value(r, "pre", c) for c in SUMMARY_COLUMNS}
            break
    best = None
    if finished:
        key = (lambda r: r["metric"]) if spec.goal == "maximize" else (lambda r: -r["metric"])
        best = max(finished, key=key)
    return {"name": spec.name, "metric": spec.metric, "goal": spec.goal, "x": x, "varying": varying, "rows": rows,
            "best": best, "pre": pre, "group": study.group, "n_finished": len(finished), "n_trials": len(rows),
            "n_failed": sum(r["status"] == "failed" for r in rows), "engine": "optuna"}


# ------------------------------------------------------------------------------------------ CLI
def preview_trials(spec: SweepSpec, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials a fresh run would start with (grid: every point in file order; random/bayes: the sampler's first
    draws, from an in-memory study)."""
    cap = count if count is not None else spec.run_cap
    if spec.method == "grid":
        points = grid_points(spec)
        return points[:cap] if cap else points
    if not cap:
        raise SweepSpecError(f"{spec.method} search needs a number of trials: run_cap in the file or --count")
    optuna = _optuna()
    study = optuna.create_study(sampler=make_sampler(spec, seed))
    out = []
    for _ in range(int(cap)):
        t = study.ask()
        out.append({k: suggest(t, k, p) for k, p in spec.parameters.items()})
        study.tell(t, 0.0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="massedit sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file", help="W&B sweep YAML, e.g. configs/sweeps/ftw_weight_decay.yaml")
    ap.add_argument("--out", help="output dir (default outputs/sweeps/<name>); rerun with the same --out to resume")
    ap.add_argument("--count", type=int, help="number of trials (random search; caps a grid)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed (random / bayes)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="fix a parameter for every trial (adds/replaces a constant parameter)")
    ap.add_argument("--extra", action="append", default=[], metavar="ARG",
                    help="extra argument appended to every trial's command")
    ap.add_argument("--devices", help="comma-separated CUDA devices: one trial per device in parallel")
    ap.add_argument("--retry-failed", action="store_true", help="rerun failed trials when resuming")
    ap.add_argument("--x", dest="x_param", help="parameter on the plot's x axis (default: first varying one)")
    ap.add_argument("--logx", action="store_true", default=None, help="log-scaled x axis (default: when the values "
                    "span a factor of 10 or more)")
    ap.add_argument("--no-wandb", action="store_true", help="do not log the summary run to W&B")
    ap.add_argument("--dry-run", action="store_true", help="print the trials' commands and exit")
    ap.add_argument("--report-only", action="store_true", help="write summary and plot of the finished trials in "
                    "--out (running none)")
    args = ap.parse_args(argv)
    from massedit.tasks.runs import configure_logging

    configure_logging("INFO")
    try:
        spec = load_sweep(args.sweep_file, overrides=args.sets)
        trials = preview_trials(spec, count=args.count, seed=args.seed) if args.dry_run else None
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
        if args.report_only:
            summary = report_sweep(spec, out, extra_args=args.extra, x_param=args.x_param, logx=args.logx,
                                   log_to_wandb=not args.no_wandb)
        else:
            summary = run_sweep(spec, out, count=args.count, seed=args.seed, devices=devices, extra_args=args.extra,
                                retry_failed=args.retry_failed, log_to_wandb=not args.no_wandb, x_param=args.x_param,
                                logx=args.logx)
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
