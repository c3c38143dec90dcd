"""How a trained model runs on many images: the per-device plan, ONNX Runtime or torch, batching,
threads and decoding workers. Shared by evaluate, predict, features, benchmark and (next) serve."""
