"""Terminal output with rich (merge progress, summaries, ``info`` and ``report`` tables) and the
report's PNG plots. Renders results; computes nothing that the JSON outputs do not carry."""
