#!/usr/bin/env bash
# Generates src/gen/ from ../../proto with protoc-gen-es v2 (TypeScript, `.js` import extensions),
# using the protoc bundled with Python's grpc_tools (PYTHON names that Python; default python3).
# The google/protobuf well-known types come from grpc_tools' include dir; protoc-gen-es maps them
# to @bufbuild/protobuf/wkt, so no file is generated for them. Stale output is deleted first and
# the output depends only on the protos and the pinned plugin version. Never edit src/gen/ by hand.
# Needs `npm ci` (or `npm install`) first, for node_modules/.bin/protoc-gen-es.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
plugin=node_modules/.bin/protoc-gen-es
[[ -x $plugin ]] || { echo "gen.sh: $plugin not found: run 'npm ci' in clients/js first" >&2; exit 1; }
wkt=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -rf src/gen && mkdir -p src/gen
protos=(../../proto/roomsecrets/v1/*.proto)
"$PY" -m grpc_tools.protoc -I ../../proto -I "$wkt" \
  --plugin=protoc-gen-es="$plugin" \
  --es_out=src/gen --es_opt=target=ts,import_extension=js \
  "${protos[@]}"
