"""Running a model: the runtimes (ONNX Runtime, TorchScript, scikit-learn, a Python handler) and the
decoding of images into a model's input. Shared by the worker, the device's local model
(``client.edge``) and the cooperative-learning sources, which must not import one another."""
