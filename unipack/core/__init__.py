"""The maths, no file I/O: rank rules and the decomposition loop, linear-algebra helpers with the
determinism a byte-identical bundle needs, fidelity numbers, and LoRA update spaces from factors.
The schemes (``unipack.schemes``) fit and encode with these."""
