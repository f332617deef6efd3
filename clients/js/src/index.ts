/**
 * @roomsecrets/client: the room Secrets API (roomsecrets.v1.RoomSecrets) for Node.js, over gRPC.
 * Errors are `ConnectError` (re-exported with `Code`); generated message types live under `./gen`.
 */
export { Code, ConnectError } from "@connectrpc/connect";
export * from "./client.js";
export {
  RejectRequest,
  type OAuthTokenRequestHandler,
  type RequestEvent,
  type SecretRequestHandler,
  type SecretValue,
} from "./handlers.js";
export { crc32c } from "./crc32c.js";
export * from "./gen/roomsecrets/v1/room_secrets_pb.js";
export * from "./gen/roomsecrets/v1/oauth_connectors_pb.js";
