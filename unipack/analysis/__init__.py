"""Numbers about a bundle: ``report`` (bytes by part, fidelity, baselines), the baselines it compares
against (mean only, per-member SVD at equal bytes) and ``scoring`` (a user's eval over members)."""
