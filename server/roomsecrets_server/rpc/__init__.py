"""gRPC adapters: protobuf in, domain call, protobuf out."""
