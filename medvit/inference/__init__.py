"""Inference: the Predictor, its engines, exports, batch and sharded prediction, the benchmark.

The engine names live here, apart from the engines themselves, so a command can offer them as choices
without importing torch (`medvit predict --help` stays fast).
"""

AUTO = "auto"
BACKENDS = ("torch", "torch-bf16", "torch-compile", "torch-compile-bf16", "onnx", "onnx-int8", "openvino",
            "openvino-int8")
GRAPH_ENGINES = ("onnx", "onnx-int8", "openvino", "openvino-int8")  # run an exported, verified graph file
