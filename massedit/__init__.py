"""massedit: mass-editing the factual memory of transformer language models (ROME, MEMIT, FT-W, MEND) on
PyTorch Lightning, with the CounterFact / zsRE evaluation. Command line: ``massedit --help``.

Python API (imported on first use, so ``import massedit`` stays light)::

    import massedit
    model, tok = massedit.load_model("smollm2-135m")
    result = massedit.edit(model, tok, [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                                         "target": "Rome"}], method="memit")
    result.apply(model); result.revert(model); result.save("edit.safetensors"); result.save_pretrained(model, tok, "out/")
    metrics = massedit.evaluate(model, tok, requests)
"""
__version__ = "0.2.0"

_API = {"load_model": "massedit.tasks.api", "edit": "massedit.tasks.api", "evaluate": "massedit.tasks.api",
        "EditResult": "massedit.tasks.api", "EditRequest": "massedit.data.requests"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'massedit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
