"""Writing bundles: ``merge`` (dense checkpoints and PEFT adapters), ``add`` (a member projected onto
an existing bundle), ``max_drop`` (``--max-drop``: the budget chosen by a user's metric) and the
lossless baseline measured at merge time."""
