#!/usr/bin/env bash
# The one generator: every generated file in the repository comes from proto/ through here.
# Called by `make gen`; CI re-runs it and fails when the committed output differs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# Python: messages, gRPC stubs and mypy-protobuf type stubs.
out=clients/python
rm -f "$out"/roomsecrets/v1/*_pb2*.py "$out"/roomsecrets/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/roomsecrets/v1/*.proto
printf '"""Generated from proto/roomsecrets/v1 by tools/gen.sh; do not edit."""\n' > "$out/roomsecrets/v1/__init__.py"

# Go: messages and gRPC stubs (protoc-gen-go, protoc-gen-go-grpc, pinned, installed by the script).
PYTHON="$PY" clients/go/gen.sh

# JS/TS: protoc-gen-es v2 from clients/js/node_modules (the Makefile runs `npm ci` first).
PYTHON="$PY" clients/js/gen.sh

# .NET generates its stubs at build time from proto/ (Grpc.Tools in the csproj); Dart needs the
# Dart SDK (clients/dart/gen.sh). Neither SDK is on the build machines: see their READMEs.
