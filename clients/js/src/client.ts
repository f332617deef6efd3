/**
 * `SecretsClient`: the room Secrets API over real gRPC (HTTP/2), with the reference SDK's method
 * names in camelCase, the Python client's behaviour (`getSecret` → null when missing, CRC32C on
 * every value) and its handler API (`secretRequestHandler` / `oauthTokenRequestHandler`).
 *
 * Failures are `ConnectError`s from @connectrpc/connect, unwrapped: switch on `error.code`
 * (`Code.NotFound`, `Code.Aborted`, ...). A value whose CRC32C does not match fails with
 * `Code.DataLoss`.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type * as http2 from "node:http2";
import { crc32c } from "./crc32c.js";
import {
  RequestServer,
  type OAuthTokenRequestHandler,
  type RequestEvent,
  type SecretRequestHandler,
  type SecretValue,
} from "./handlers.js";
import { OAuthConnectors, type ConnectorInfo } from "./gen/roomsecrets/v1/oauth_connectors_pb.js";
import {
  ConnectorRefSchema,
  OAuthClientConfigSchema,
  RoomSecrets,
  type SecretInfo,
} from "./gen/roomsecrets/v1/room_secrets_pb.js";

/** Where the server listens when no `baseUrl` is given. */
export const DEFAULT_BASE_URL = "http://127.0.0.1:50051";
/** Deadline of every unary call except the waiting ones (requestSecret, requestOAuthToken). */
export const DEFAULT_CALL_TIMEOUT_MS = 30_000;
/** A waiting call's gRPC deadline is its `timeout` plus this much, so the server's own answer
 * (DEADLINE_EXCEEDED, reason REQUEST_EXPIRED) normally arrives first. */
export const REQUEST_DEADLINE_MARGIN_MS = 5_000;
const DEFAULT_TYPE = "application/octet-stream";
const encoder = new TextEncoder();

/** A bearer token, or a function returning the current one (called before every call). */
export type TokenSource = string | (() => string | Promise<string>);
/** An inline OAuth client (its secret goes to the server only). */
export type OAuthClientConfigInit = MessageInitShape<typeof OAuthClientConfigSchema>;
/** A reference to an OAuth client registration held by the server (a connector). */
export type ConnectorRefInit = MessageInitShape<typeof ConnectorRefSchema>;

/** A secret's value as `getSecret` returns it (the reference's FileContent). */
export interface FileContent {
  data: Uint8Array;
  name: string;
  /** The secret's type (a MIME type or kind). */
  mimeType: string;
  /** Full metadata: etag, delegation, size, update time. */
  info: SecretInfo;
}

export interface SecretsClientOptions {
  /** `http://host:port` for plaintext, `https://host:port` for TLS. Default http://127.0.0.1:50051. */
  baseUrl?: string;
  /** The participant JWT, sent as `authorization: Bearer <token>` on every call. */
  token?: TokenSource;
  /** Options for Node's `http2.connect()`; for TLS: `ca`, `cert` + `key` (mutual TLS), `servername`. */
  nodeOptions?: http2.ClientSessionOptions | http2.SecureClientSessionOptions;
  /** Extra interceptors, run after the one that sets the bearer token. */
  interceptors?: Interceptor[];
  /** Deadline of each unary call in milliseconds (default 30 000; 0 for none). */
  callTimeoutMs?: number;
  /** Answers inbound secret requests once `start()` is called. */
  secretRequestHandler?: SecretRequestHandler;
  /** Answers inbound OAuth requests once `start()` is called. */
  oauthTokenRequestHandler?: OAuthTokenRequestHandler;
  /** Called with handler-side failures that have no caller to surface to. */
  onError?: (error: unknown) => void;
}

export interface GetSecretOptions {
  secretId?: string;
  type?: string;
  name?: string;
  delegatedTo?: string;
  /** Read a secret another participant delegated to you: the owner's identity. */
  delegatedBy?: string;
}

export interface SetSecretOptions {
  /** Addresses the secret; without it (`type`, `name`) do, and the server assigns an id. */
  secretId?: string;
  type?: string;
  name?: string;
  data: SecretValue;
  delegatedTo?: string;
  /** Store it for another identity (room admin only). */
  forIdentity?: string;
  /** Check-and-set: write only if the secret is still at this version (ABORTED otherwise). */
  etag?: string;
}

export interface RequestSecretOptions {
  /** Default `application/octet-stream`. */
  type?: string;
  /** Seconds to wait (default 300), rounded up to whole seconds. */
  timeout?: number;
  /** Identity the provided secret is delegated to. */
  delegateTo?: string;
  /** Aborting cancels the request on the server. */
  signal?: AbortSignal;
}

export interface RequestOAuthTokenOptions {
  oauth?: OAuthClientConfigInit;
  connector?: ConnectorRefInit;
  fromParticipantId: string;
  redirectUri: string;
  delegateTo?: string;
  /** Seconds to wait (default 300). */
  timeout?: number;
  signal?: AbortSignal;
}

export interface OfflineOAuthTokenOptions {
  oauth?: OAuthClientConfigInit;
  connector?: ConnectorRefInit;
  delegatedTo?: string;
  delegatedBy?: string;
}

function bytes(data: SecretValue): Uint8Array {
  if (typeof data === "string") return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  throw new TypeError("data must be a Uint8Array or a string");
}

function verified(data: Uint8Array, checksum: bigint, what: string): Uint8Array {
  if (BigInt(crc32c(data)) !== checksum) {
    throw new ConnectError(`${what}: the received value does not match its CRC32C`, Code.DataLoss);
  }
  return data;
}

function requestSeconds(timeout: number): number {
  if (!(timeout > 0)) throw new RangeError("timeout must be positive (seconds)");
  return Math.ceil(timeout);
}

function provider(oauth?: OAuthClientConfigInit, connector?: ConnectorRefInit) {
  if (oauth && connector) throw new TypeError("give either oauth or connector, not both");
  if (oauth) return { case: "oauth" as const, value: create(OAuthClientConfigSchema, oauth) };
  if (connector) return { case: "connector" as const, value: create(ConnectorRefSchema, connector) };
  return { case: undefined };
}

function isCode(error: unknown, code: Code): boolean {
  return error instanceof ConnectError && error.code === code;
}

/**
 * The room Secrets API.
 *
 * ```ts
 * const client = new SecretsClient({ baseUrl: "http://127.0.0.1:50051", token });
 * await client.setSecret({ secretId: "db", type: "text/plain", data: "postgres://..." });
 * const content = await client.getSecret("db"); // FileContent, or null when missing
 * client.close();
 * ```
 */
export class SecretsClient {
  /** Deadline of each unary call in milliseconds (0: none). */
  callTimeoutMs: number;
  private readonly rooms: Client<typeof RoomSecrets>;
  private readonly connectors: Client<typeof OAuthConnectors>;
  private readonly session: Http2SessionManager;
  private readonly options: SecretsClientOptions;
  private server: RequestServer | undefined;
  private closed = false;

  constructor(options: SecretsClientOptions = {}) {
    this.options = options;
    this.callTimeoutMs = options.callTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    const { token } = options;
    const bearer: Interceptor = (next) => async (req) => {
      const value = typeof token === "function" ? await token() : token;
      if (value) req.header.set("authorization", `Bearer ${value}`);
      return next(req);
    };
    const baseUrl = options.baseUrl ?? DEFAULT_BASE_URL;
    this.session = new Http2SessionManager(
      baseUrl,
      { pingIntervalMs: 60_000, pingTimeoutMs: 20_000 },
      options.nodeOptions,
    );
    const transport = createGrpcTransport({
      baseUrl,
      sessionManager: this.session,
      interceptors: [bearer, ...(options.interceptors ?? [])],
    });
    this.rooms = createClient(RoomSecrets, transport);
    this.connectors = createClient(OAuthConnectors, transport);
  }

  private call(signal?: AbortSignal, timeoutMs: number = this.callTimeoutMs): CallOptions {
    return { signal, timeoutMs: timeoutMs > 0 ? timeoutMs : undefined };
  }

  // -- lifecycle -------------------------------------------------------------------------------

  /**
   * Start answering inbound requests with the constructor's handlers (a request for which no
   * handler was given is rejected at once). Resolves once the WatchRequests stream is live;
   * rejects with its `ConnectError` if it cannot be opened (e.g. UNAUTHENTICATED). The stream
   * reconnects on transient failures until `close()`.
   */
  async start(): Promise<void> {
    if (this.closed) throw new Error("the client is closed");
    if (!this.server) {
      this.server = new RequestServer(this, {
        secretRequestHandler: this.options.secretRequestHandler,
        oauthTokenRequestHandler: this.options.oauthTokenRequestHandler,
        onError: this.options.onError,
      });
    }
    const server = this.server;
    try {
      await server.ready;
    } catch (error) {
      if (this.server === server) this.server = undefined;
      await server.stop(0);
      throw error;
    }
  }

  /** Stop the request handlers (letting running ones finish, up to 10 s), then close the
   * connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const server = this.server;
    this.server = undefined;
    await server?.stop();
    this.session.abort();
  }

  /** `await using client = new SecretsClient(...)` closes it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // -- storage ---------------------------------------------------------------------------------

  /** Every secret you own in the room, and those delegated to you (all pages). Never values. */
  async listSecrets(options: { pageSize?: number; signal?: AbortSignal } = {}): Promise<SecretInfo[]> {
    const out: SecretInfo[] = [];
    let pageToken = "";
    do {
      const reply = await this.rooms.listSecrets(
        { pageSize: options.pageSize ?? 0, pageToken },
        this.call(options.signal),
      );
      out.push(...reply.secrets);
      pageToken = reply.nextPageToken;
    } while (pageToken);
    return out;
  }

  /** Whether a secret exists, without reading it. */
  async exists(secretId: string, options: { delegatedTo?: string; forIdentity?: string } = {}): Promise<boolean> {
    const reply = await this.rooms.exists(
      { secretId, delegatedTo: options.delegatedTo ?? "", forIdentity: options.forIdentity ?? "" },
      this.call(),
    );
    return reply.exists;
  }

  /** Create or replace a secret, by `secretId` or by (`type`, `name`); returns its metadata. */
  async setSecret(options: SetSecretOptions): Promise<SecretInfo> {
    if (options.data === undefined || options.data === null) throw new TypeError("secret data is required");
    const data = bytes(options.data);
    const reply = await this.rooms.setSecret(
      {
        secretId: options.secretId ?? "",
        type: options.type ?? "",
        name: options.name ?? "",
        data,
        delegatedTo: options.delegatedTo ?? "",
        forIdentity: options.forIdentity ?? "",
        etag: options.etag ?? "",
        dataCrc32c: BigInt(crc32c(data)),
      },
      this.call(),
    );
    return reply.secret!;
  }

  /** A secret's value and metadata, by id (a string) or by (`type`, `name`); **null when missing**. */
  async getSecret(ref: string | GetSecretOptions): Promise<FileContent | null> {
    const o: GetSecretOptions = typeof ref === "string" ? { secretId: ref } : ref;
    let reply;
    try {
      reply = await this.rooms.getSecret(
        {
          secretId: o.secretId ?? "",
          type: o.type ?? "",
          name: o.name ?? "",
          delegatedTo: o.delegatedTo ?? "",
          delegatedBy: o.delegatedBy ?? "",
        },
        this.call(),
      );
    } catch (error) {
      if (isCode(error, Code.NotFound)) return null;
      throw error;
    }
    const info = reply.secret!;
    const data = verified(reply.data, reply.dataCrc32c, `secret ${JSON.stringify(info.id)}`);
    return { data, name: info.name, mimeType: info.type, info };
  }

  /** Delete a secret (a delegated one is named with its `delegatedTo`); `etag` for check-and-set. */
  async deleteSecret(secretId: string, options: { delegatedTo?: string; etag?: string } = {}): Promise<void> {
    await this.rooms.deleteSecret(
      { secretId, delegatedTo: options.delegatedTo ?? "", etag: options.etag ?? "" },
      this.call(),
    );
  }

  /** Delete a secret obtained through a request, by (`url`, `type`), to force a new prompt. */
  async deleteRequestedSecret(url: string, type: string, options: { delegatedTo?: string } = {}): Promise<void> {
    await this.rooms.deleteRequestedSecret({ url, type, delegatedTo: options.delegatedTo ?? "" }, this.call());
  }

  // -- secret requests -------------------------------------------------------------------------

  /**
   * Ask participant `fromParticipantId` for a secret (`url` says what is wanted) and wait up to
   * `timeout` seconds for it. Fails with PERMISSION_DENIED when rejected (the message carries the
   * reason), DEADLINE_EXCEEDED when nobody answers in time, FAILED_PRECONDITION when nobody is
   * watching requests for that identity.
   */
  async requestSecret(fromParticipantId: string, url: string, options: RequestSecretOptions = {}): Promise<Uint8Array> {
    const seconds = requestSeconds(options.timeout ?? 300);
    const reply = await this.rooms.requestSecret(
      {
        fromParticipantId,
        url,
        type: options.type || DEFAULT_TYPE,
        timeout: seconds,
        delegateTo: options.delegateTo ?? "",
      },
      this.call(options.signal, seconds * 1000 + REQUEST_DEADLINE_MARGIN_MS),
    );
    return verified(reply.data, reply.dataCrc32c, `request ${reply.requestId}`);
  }

  /** Answer an inbound request with the value (stored as your secret, delegated as asked). */
  async provideSecret(requestId: string, data: SecretValue): Promise<void> {
    const value = bytes(data);
    await this.rooms.provideSecret({ requestId, data: value, dataCrc32c: BigInt(crc32c(value)) }, this.call());
  }

  /** Refuse an inbound request; `error` is passed to the requester. */
  async rejectSecret(requestId: string, error: string): Promise<void> {
    await this.rooms.rejectSecret({ requestId, error }, this.call());
  }

  // -- OAuth -----------------------------------------------------------------------------------

  /** Obtain an OAuth access token that `fromParticipantId` authorizes (a valid stored one is
   * returned without prompting); null if the provider returned none. */
  async requestOAuthToken(options: RequestOAuthTokenOptions): Promise<string | null> {
    const seconds = requestSeconds(options.timeout ?? 300);
    const reply = await this.rooms.requestOAuthToken(
      {
        provider: provider(options.oauth, options.connector),
        fromParticipantId: options.fromParticipantId,
        redirectUri: options.redirectUri,
        delegateTo: options.delegateTo ?? "",
        timeout: seconds,
      },
      this.call(options.signal, seconds * 1000 + REQUEST_DEADLINE_MARGIN_MS),
    );
    return reply.accessToken || null;
  }

  /** Answer an inbound OAuth request with the authorization code from the provider's redirect. */
  async provideOAuthAuthorization(requestId: string, code: string, options: { state?: string } = {}): Promise<void> {
    await this.rooms.provideOAuthAuthorization({ requestId, code, state: options.state ?? "" }, this.call());
  }

  /** Refuse an inbound OAuth request; `error` is passed to the requester. */
  async rejectOAuthAuthorization(requestId: string, error: string): Promise<void> {
    await this.rooms.rejectOAuthAuthorization({ requestId, error }, this.call());
  }

  /** The stored token for that provider and delegation (refreshed by the server when expired);
   * never prompts. Null when there is none or it needs re-authorization. */
  async getOfflineOAuthToken(options: OfflineOAuthTokenOptions = {}): Promise<string | null> {
    const reply = await this.rooms.getOfflineOAuthToken(
      {
        provider: provider(options.oauth, options.connector),
        delegatedTo: options.delegatedTo ?? "",
        delegatedBy: options.delegatedBy ?? "",
      },
      this.call(),
    );
    return reply.accessToken || null;
  }

  // -- OAuth connectors (room admins keep client registrations server-side) --------------------

  /** Create or replace a connector (room admin). An empty clientSecret keeps the stored one. */
  async setConnector(name: string, client: OAuthClientConfigInit): Promise<ConnectorInfo> {
    const reply = await this.connectors.setConnector(
      { name, client: create(OAuthClientConfigSchema, client) },
      this.call(),
    );
    return reply.connector!;
  }

  /** A connector without its client secret; null when there is none by that name. */
  async getConnector(name: string): Promise<ConnectorInfo | null> {
    try {
      return (await this.connectors.getConnector({ name }, this.call())).connector ?? null;
    } catch (error) {
      if (isCode(error, Code.NotFound)) return null;
      throw error;
    }
  }

  /** Every connector of the room, sorted by name, without client secrets. */
  async listConnectors(): Promise<ConnectorInfo[]> {
    return (await this.connectors.listConnectors({}, this.call())).connectors;
  }

  /** Delete a connector (room admin). */
  async deleteConnector(name: string): Promise<void> {
    await this.connectors.deleteConnector({ name }, this.call());
  }

  // -- the inbound side ------------------------------------------------------------------------

  /**
   * Requests addressed to you: first those still pending, then a `ready` event, then new
   * requests and `requestClosed` events. Each event is `{ case, value }` with `case` one of
   * `"secretRequest"`, `"oauthRequest"`, `"requestClosed"`, `"ready"`. Breaking out of the loop or
   * aborting `signal` ends the stream (iteration then simply stops).
   */
  async *watchRequests(options: { signal?: AbortSignal } = {}): AsyncGenerator<RequestEvent, void, undefined> {
    const { signal } = options;
    try {
      for await (const message of this.rooms.watchRequests({}, { signal })) {
        if (message.event.case !== undefined) yield message.event;
      }
    } catch (error) {
      if (signal?.aborted && isCode(error, Code.Canceled)) return;
      throw error;
    }
  }
}
