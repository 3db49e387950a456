"""Forward hooks for reading and editing module inputs/outputs (the reference's ``nethook``, re-done).

``Trace`` retains the input/output of one named module, optionally rewrites its output with
``edit_output(output, name)``, and can stop the forward pass right after that module (saving the
compute of all later layers, as the statistics collector does). ``TraceDict`` does the same for
several modules at once and stops after the *last* of them has run.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by the tracing context."""


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    return None


def _detach_clone(x, clone: bool, detach: bool):
    if isinstance(x, torch.Tensor):
        if detach:
            x = x.detach()
        if clone:
            x = x.clone()
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_detach_clone(v, clone, detach) for v in x)
    return x


class Trace(contextlib.AbstractContextManager):
    """Hook one module. Attributes ``input`` / ``output`` hold what it saw (after the edit)."""

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[[Any, str], Any] | None = None,
        stop: bool = False,
        clone: bool = False,
        detach: bool = False,
    ) -> None:
        self.layer = layer
        self.input = None
        self.output = None
        self.stop = stop
        module = model.get_submodule(layer)

        def hook(mod, args, kwargs, output):
            if retain_input:
                self.input = _detach_clone(_first_input(args, kwargs), clone, detach)
            if edit_output is not None:
                output = edit_output(output, layer)
            if retain_output:
                self.output = _detach_clone(output, clone, detach)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook, with_kwargs=True)

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        self._handle.remove()


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Hook several modules; ``td[name]`` is that module's :class:`Trace`.

    With ``stop=True`` the forward pass stops after the last listed module to finish (the last one in
    execution order, or the outermost listed module containing it), so every listed module has run by then.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Callable[[Any, str], Any] | None = None,
        stop: bool = False,
        clone: bool = False,
        detach: bool = False,
    ) -> None:
        super().__init__()
        layers = list(dict.fromkeys(layers))
        # execution order == registration order in named_modules for these architectures
        order = {name: k for k, (name, _) in enumerate(model.named_modules())}
        missing = [n for n in layers if n not in order]
        if missing:
            raise KeyError(f"modules not found in model: {missing}")
        last = max(layers, key=lambda n: order[n]) if layers else None
        # a listed module that contains `last` finishes after it (hooks fire when a forward returns): stop there
        enclosing = [n for n in layers if last is not None and last.startswith(n + ".")]
        if enclosing:
            last = min(enclosing, key=lambda n: order[n])
        for name in layers:
            self[name] = Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                edit_output=edit_output,
                stop=stop and name == last,
                clone=clone,
                detach=detach,
            )

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        for t in reversed(list(self.values())):
            t.close()

