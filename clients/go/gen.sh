#!/usr/bin/env bash
# Generates roomsecretsv1/*.pb.go (messages and gRPC stubs) from ../../proto.
#
# The plugins are pinned below and installed into $TOOLS (default: <repo>/.tools/bin); protoc is
# the one bundled with Python's grpc_tools (pinned by the project's venv), so the output is the
# same on every machine. The generated files are committed and never edited by hand.
#
#   PYTHON=/path/to/.venv/bin/python ./gen.sh
set -euo pipefail
cd "$(dirname "$0")"

PROTOC_GEN_GO_VERSION=v1.36.12     # google.golang.org/protobuf (keep equal to go.mod)
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2  # google.golang.org/grpc/cmd/protoc-gen-go-grpc
MODULE=github.com/roomsecrets/roomsecrets/clients/go

PY=${PYTHON:-python3}
if [[ -z "${TOOLS:-}" ]]; then
  root=$(git rev-parse --show-toplevel 2>/dev/null) || root=$(cd ../.. && pwd)
  TOOLS=$root/.tools/bin
fi
mkdir -p "$TOOLS"
TOOLS=$(cd "$TOOLS" && pwd)

# install <binary> <package> <version>: `go install` unless that version is already there.
install() {
  local bin=$1 pkg=$2 version=$3 have=""
  if [[ -x "$TOOLS/$bin" ]]; then
    have=$("$TOOLS/$bin" --version 2>/dev/null | awk '{print $NF}') || have=""
  fi
  if [[ "v${have#v}" != "$version" ]]; then
    echo "installing $pkg@$version into $TOOLS" >&2
    GOBIN="$TOOLS" go install "$pkg@$version"
  fi
}
install protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

rm -f roomsecretsv1/*.pb.go
mkdir -p roomsecretsv1
"$PY" -m grpc_tools.protoc -I ../../proto \
  --plugin=protoc-gen-go="$TOOLS/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$TOOLS/protoc-gen-go-grpc" \
  --go_out=. --go_opt=module="$MODULE" \
  --go-grpc_out=. --go-grpc_opt=module="$MODULE" \
  ../../proto/roomsecrets/v1/*.proto
