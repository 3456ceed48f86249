"""Bytes on disk: the safetensors-compatible .upk container, its manifest, codecs and atomic writes.

Nothing in this package does linear algebra; it moves validated bytes in and out of files.
"""
