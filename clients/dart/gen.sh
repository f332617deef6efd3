#!/usr/bin/env bash
# Generates lib/src/gen/ from ../../proto with protoc-gen-dart. Needs the Dart SDK
# (`dart pub global activate protoc_plugin 21.1.2`, which puts protoc-gen-dart on PATH) and protoc.
# Not run by `make gen`: there is no Dart SDK on the machines this project is built on, so the
# generated Dart code is NOT committed. Run this once before `dart pub get && dart test`.
set -euo pipefail
cd "$(dirname "$0")"
command -v protoc-gen-dart >/dev/null || { echo "protoc-gen-dart not found: dart pub global activate protoc_plugin" >&2; exit 1; }
rm -rf lib/src/gen && mkdir -p lib/src/gen
protoc -I ../../proto --dart_out=grpc:lib/src/gen \
  ../../proto/roomsecrets/v1/*.proto google/protobuf/timestamp.proto
