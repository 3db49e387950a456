"""massedit: mass-editing the factual memory of transformer language models (ROME, MEMIT, FT-W, MEND) on
PyTorch Lightning, with the CounterFact / zsRE evaluation. Command line: ``massedit --help``."""
__version__ = "0.2.0"
