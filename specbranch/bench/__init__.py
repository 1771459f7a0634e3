"""`specbranch bench`: engines side by side on real prompts, interleaved, with output checks."""
