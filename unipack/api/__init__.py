"""The bundle API: merge checkpoints into a bundle, open a bundle, load and extract members."""
