"""Members of a bundle in the formats other tools load: a ``.safetensors`` file, a Hugging Face
model folder, a PEFT adapter folder, a torch ``nn.Module`` and an ONNX model (checked with ONNX
Runtime). Every exporter is a function of a ``BundleReader``; none is imported by the reader."""
