"""Storage schemes: one module per way of storing a tensor, behind one registry.

Adding a scheme: write its module here (a ``StorageParams`` subclass for its manifest fields
and a ``Scheme`` subclass for the rest, see ``base.py``), register it with its last line
(``NAME = register(NameScheme())``), import it below, specify it in ``format_spec/``, and test
it (the spec reader in ``tests/test_spec_reader.py`` must decode it bit for bit).
"""

# isort: off
# Registration order is the order in which the spec lists them, and in which error messages list
# the allowed ``storage``, ``scheme`` and ``form`` values: keep it.
from unipack.schemes import rows, flat, raw, exact, lora_subspace, lora_factors, delta, lora_quant, lora_factored  # noqa: F401  (registers them)

# isort: on
from unipack.schemes.base import AddContext, MemberView, Scheme
from unipack.schemes.registry import SCHEMES, is_lora, register, scheme_of

__all__ = ["SCHEMES", "AddContext", "MemberView", "Scheme", "is_lora", "register", "scheme_of"]
