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
