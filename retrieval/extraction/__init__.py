"""Images to raw descriptors: decoding, the windows, the networks (torchvision and ONNX),
the extractor that batches windows through them, and the feature store keyed by content."""
