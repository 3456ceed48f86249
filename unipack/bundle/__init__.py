"""Reading bundles: ``BundleReader`` (members rebuilt on demand, one blob at a time), LoRA members'
factors and updates, and ``summary`` (the numbers ``unipack info`` prints). Nothing here writes."""
