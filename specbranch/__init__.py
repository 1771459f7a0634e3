"""specbranch: lossless speculative decoding (SpecBranch, PEARL, classic SD)."""

__version__ = "0.1.0"
