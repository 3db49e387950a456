"""Where a model's weights live when it is dispatched over several devices (``model.device_map``).

With accelerate's big-model dispatch a layer may run on a GPU while its weights are kept elsewhere ("offloaded":
the module's parameters are on the ``meta`` device and its ``AlignDevicesHook`` loads them from a weights map before
every forward — CPU memory, or the checkpoint file on disk). Editors read and write weights through
:func:`param_storage`: the parameter itself when it is on a real device, else the offloaded copy (taken into memory
on first use, so that an in-place write sticks and is what the next forward loads). Everything here is a no-op
for an ordinary model.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def is_dispatched(model: nn.Module) -> bool:
    """True for a model placed by accelerate over several devices (``from_pretrained(device_map=...)``)."""
    return bool(getattr(model, "hf_device_map", None))


def _hooks(hook) -> list:
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # SequentialHook holds several


def _offload_slot(model: nn.Module, name: str):
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    for h in _hooks(getattr(mod, "_hf_hook", None)):
        wm = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and wm is not None:
            return wm, pname
    return None


def _resident(weights_map, key: str) -> torch.Tensor:
    """The in-memory tensor of ``key`` in an accelerate weights map (moved into its state dict if it was on disk)."""
    prefix, ds = getattr(weights_map, "prefix", ""), getattr(weights_map, "dataset", None)
    if ds is None:  # a plain dict of tensors
        return weights_map[key]
    full = prefix + key
    sd = getattr(ds, "state_dict", None)
    if sd is None:
        return ds[full]
    if full not in sd:
        sd[full] = ds[full].clone()  # from the offload file / checkpoint: keep a writable copy in memory
    return sd[full]


def param_storage(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds parameter ``name``'s values (write into it in place to change the weight)."""
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p
    slot = _offload_slot(model, name)
    if slot is None:
        raise RuntimeError(f"parameter {name} is on the meta device and no offload hook holds its values")
    return _resident(*slot)


def storage_version(model: nn.Module, name: str) -> int | None:
    """The in-place write counter of parameter ``name``'s values (``None``: offloaded and never loaded, so never
    written), without loading an offloaded weight."""
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p._version
    slot = _offload_slot(model, name)
    if slot is None:
        return None
    wm, key = slot
    ds = getattr(wm, "dataset", None)
    if ds is None:
        t = wm.get(key) if hasattr(wm, "get") else None
        return None if t is None else t._version
    sd = getattr(ds, "state_dict", None)
    full = getattr(wm, "prefix", "") + key
    return sd[full]._version if sd is not None and full in sd else None


def storage_device(model: nn.Module, name: str) -> torch.device:
    return param_storage(model, name).device


def read_tensor(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (parameter or buffer ``name`` of ``model``) with its values: offloaded ones read from their weights map
    without keeping a copy (for fingerprints and comparisons)."""
    if t.device.type != "meta":
        return t
    slot = _offload_slot(model, name)
    if slot is None:
        raise RuntimeError(f"{name} is on the meta device and no offload hook holds its values")
    wm, key = slot
    return wm[key]


def named_tensors(model: nn.Module, buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, values)`` of every parameter (tied duplicates included) and buffer, offloaded ones read back."""
    named = list(model.named_parameters(remove_duplicate=False))
    if buffers:
        named += list(model.named_buffers(remove_duplicate=False))
    for n, t in named:
        yield n, read_tensor(model, n, t)


def execution_device(model: nn.Module, module_name: str) -> torch.device:
    """The device ``module_name`` computes on (its hook's execution device when dispatched, else its weights')."""
    mod = model.get_submodule(module_name)
    for h in _hooks(getattr(mod, "_hf_hook", None)):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    p = next((q for q in mod.parameters() if q.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")
