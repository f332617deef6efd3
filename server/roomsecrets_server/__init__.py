"""roomsecrets server: a gRPC secrets service for rooms of humans, agents and services.

Layout (request flow top to bottom):
  rpc/        thin gRPC adapters: protobuf in, domain call, protobuf out; errors.py maps every
              DomainError to a gRPC status in one table
  secrets/    room secrets domain service (set/get/list/delete, delegation, check-and-set)
  requests/   request -> provide | reject flows and the WatchRequests event stream
  oauth/      OAuth flows (implemented by the OAuth issue)
  auth/       participant JWT verification, grants, dev signing key
  crypto/     envelope encryption (AES-256-GCM, wrapped data keys) and the key-encryption keyring
  store/      storage backends behind one interface; they only ever see sealed bytes
  config.py   settings; cli/ the `roomsecrets` command
"""

__version__ = "0.1.0"
