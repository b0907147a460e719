"""The Open Inference Protocol's gRPC service as Triton publishes it (``inference.GRPCInferenceService``,
the protocol KServe names v2; ``tritonclient.grpc`` speaks it), with the stubs protoc makes from it.

``grpc_service.proto`` and ``model_config.proto`` are Triton's, unchanged, from
github.com/triton-inference-server/common (``protobuf/``, commit 83adf7cf88a2, 2026-07-23), under the
BSD 3-clause licence in ``LICENSE`` here (Copyright NVIDIA CORPORATION & AFFILIATES). The ``_pb2``
files are generated and committed; regenerate them from this folder with grpcio-tools 1.81.1 (its
protobuf 6.33.5 gencode runs on protobuf 6.33 and 7):

    cd shoal/protocol/oip_grpc && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \\
        grpc_service.proto model_config.proto && rm -f model_config_pb2_grpc.py && \\
        sed -i 's/^import \\(model_config_pb2\\|grpc_service_pb2\\) as/from . import \\1 as/' *_pb2*.py

Imported only by ``shoal.gateway.grpc_app`` (the ``grpc`` extra): nothing else needs protobuf.
"""
