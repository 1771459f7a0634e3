"""specbranch: lossless speculative decoding (SpecBranch, PEARL, classic SD)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from specbranch import Pipeline` without importing torch for every `specbranch --help`
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'specbranch' has no attribute {name!r}")
