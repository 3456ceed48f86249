"""The maths: per-tensor decompositions, rank selection and reconstruction. No file I/O here.

A decomposition sees its members only through a ``MemberArrays`` source (load member i's
tensor as a float array), so it never holds more than a bounded number of members at once.
"""

from unipack.core import flat, rows  # noqa: E402,F401  (importing a scheme module registers it)
