"""`visiontune export`: a classifier run as ONNX, TorchScript or a Triton model repository, each
file checked against the eager torch model on the run's own validation images."""
