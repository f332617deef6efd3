/**
 * The handler API for inbound requests, on top of `watchRequests` (as the reference SDK's
 * `secretRequestHandler` / `oauthTokenRequestHandler`), with the Python client's semantics:
 *
 * - a secret handler returns the value (bytes or a string) to provide it, or null/undefined to
 *   decline; an OAuth handler returns the authorization code (or null/undefined to decline);
 * - if a handler throws, the request is rejected with the error's text; throw
 *   `RejectRequest("reason")` to reject with exactly that reason;
 * - nobody is left waiting: a request with no handler, whose handler fails or returns something
 *   unusable, is rejected at once;
 * - the stream reconnects (with backoff) when the connection drops, and requests replayed on
 *   reconnect are not handled twice.
 *
 * Handlers never put a secret value into a reason.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { setTimeout as sleep } from "node:timers/promises";
import type {
  OAuthRequest,
  SecretRequest,
  WatchRequestsResponse,
} from "./gen/roomsecrets/v1/room_secrets_pb.js";

/** A value handed to `setSecret` / `provideSecret`: bytes, or a string (sent as UTF-8). */
export type SecretValue = Uint8Array | string;

type Maybe<T> = T | null | undefined;

/** Answers an inbound secret request: the value to provide, or null/undefined to decline. */
export type SecretRequestHandler = (request: SecretRequest) => Maybe<SecretValue> | Promise<Maybe<SecretValue>>;

/** Answers an inbound OAuth request: the authorization code, or null/undefined to decline. */
export type OAuthTokenRequestHandler = (request: OAuthRequest) => Maybe<string> | Promise<Maybe<string>>;

/** One event of the WatchRequests stream: `secretRequest`, `oauthRequest`, `requestClosed` or `ready`. */
export type RequestEvent = Exclude<WatchRequestsResponse["event"], { case: undefined }>;

/** Throw from a handler to reject the request with this reason (shown to the requester). */
export class RejectRequest extends Error {
  override name = "RejectRequest";
}

/** What the handler machinery needs from the client. */
export interface RequestAnswerer {
  watchRequests(options?: { signal?: AbortSignal }): AsyncIterable<RequestEvent>;
  provideSecret(requestId: string, data: SecretValue): Promise<void>;
  rejectSecret(requestId: string, error: string): Promise<void>;
  provideOAuthAuthorization(requestId: string, code: string, options?: { state?: string }): Promise<void>;
  rejectOAuthAuthorization(requestId: string, error: string): Promise<void>;
}

export interface RequestServerOptions {
  secretRequestHandler?: SecretRequestHandler;
  oauthTokenRequestHandler?: OAuthTokenRequestHandler;
  /** Reconnect when the stream drops for a transient reason (default true). */
  reconnect?: boolean;
  /** Called with failures that have no caller to surface to (a stream that ended for good, an
   * answer that could not be delivered). Default: ignored. */
  onError?: (error: unknown) => void;
}

const NO_HANDLER = {
  secret: "no secret request handler is registered",
  oauth: "no OAuth request handler is registered",
} as const;
const DECLINED = "declined";
const MAX_REASON = 1000; // the server accepts 1024 characters
const FIRST_DELAY_MS = 100;
const MAX_DELAY_MS = 5000;
// Stream failures worth reconnecting after; anything else (bad token, no grant) is final.
const RETRYABLE = new Set<Code>([
  Code.Unavailable,
  Code.Canceled,
  Code.Internal,
  Code.Unknown,
  Code.DeadlineExceeded,
  Code.ResourceExhausted,
  Code.Aborted,
]);

/** One line the server accepts: no control characters, at most 1000 characters. */
export function cleanReason(text: string): string {
  // eslint-disable-next-line no-control-regex
  const line = text.replace(/[\x00-\x1f\x7f]+/g, " ").trim();
  return line.length <= MAX_REASON ? line : line.slice(0, MAX_REASON - 3) + "...";
}

function failureReason(error: unknown): string {
  if (error instanceof RejectRequest) return cleanReason(error.message) || "rejected";
  const name = error instanceof Error ? error.name : typeof error;
  const text = cleanReason(error instanceof Error ? error.message : String(error));
  return cleanReason(`handler failed: ${name}` + (text ? `: ${text}` : ""));
}

/** Watches requests addressed to the client and answers them with the handlers. Internal: use
 * `SecretsClient.start()` / `close()`. */
export class RequestServer {
  /** Resolves once the stream is live (after the replay of pending requests); rejects with the
   * error if the stream fails for good first. */
  readonly ready: Promise<void>;
  /** The error that ended the stream for good (e.g. UNAUTHENTICATED), if any. */
  error: ConnectError | undefined;
  provided = 0;
  rejected = 0;

  private readonly abort = new AbortController();
  private readonly inflight = new Map<string, Promise<void>>();
  private readonly loop: Promise<void>;
  private readonly onError: (error: unknown) => void;
  private setReady!: () => void;
  private setFailed!: (error: Error) => void;

  constructor(
    private readonly client: RequestAnswerer,
    private readonly options: RequestServerOptions,
  ) {
    this.onError = options.onError ?? (() => {});
    this.ready = new Promise<void>((resolve, reject) => {
      this.setReady = resolve;
      this.setFailed = reject;
    });
    this.ready.catch(() => {}); // observed by start(); never an unhandled rejection
    this.loop = this.run();
  }

  /** Close the stream and wait (up to `timeoutMs`) for the handlers still running. */
  async stop(timeoutMs = 10_000): Promise<void> {
    this.abort.abort();
    await this.loop;
    const pending = Promise.allSettled([...this.inflight.values()]);
    const timer = sleep(timeoutMs, undefined, { ref: false });
    await Promise.race([pending, timer]);
  }

  private async run(): Promise<void> {
    const { signal } = this.abort;
    const reconnect = this.options.reconnect ?? true;
    let delay = FIRST_DELAY_MS;
    while (!signal.aborted) {
      try {
        for await (const event of this.client.watchRequests({ signal })) {
          if (event.case === "ready") {
            delay = FIRST_DELAY_MS;
            this.setReady();
          } else if (event.case === "secretRequest") {
            this.dispatch("secret", event.value);
          } else if (event.case === "oauthRequest") {
            this.dispatch("oauth", event.value);
          }
        }
      } catch (err) {
        if (signal.aborted) break;
        const error = ConnectError.from(err);
        if (!reconnect || !RETRYABLE.has(error.code)) {
          this.error = error;
          this.setFailed(error);
          this.onError(error);
          break;
        }
      }
      if (!reconnect || signal.aborted) break;
      try {
        await sleep(delay, undefined, { signal });
      } catch {
        break;
      }
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
    this.setFailed(new Error("the request handlers have stopped"));
  }

  private dispatch(kind: "secret" | "oauth", request: SecretRequest | OAuthRequest): void {
    const id = request.requestId;
    if (this.inflight.has(id)) return; // replayed after a reconnect: already being handled
    const answering = this.answer(kind, request)
      .catch(this.onError)
      .finally(() => this.inflight.delete(id));
    this.inflight.set(id, answering);
  }

  private async answer(kind: "secret" | "oauth", request: SecretRequest | OAuthRequest): Promise<void> {
    const id = request.requestId;
    const handler =
      kind === "secret" ? this.options.secretRequestHandler : this.options.oauthTokenRequestHandler;
    if (!handler) return this.reject(kind, id, NO_HANDLER[kind]);
    let result: unknown;
    try {
      result = await (handler as (r: typeof request) => unknown)(request);
    } catch (error) {
      return this.reject(kind, id, failureReason(error));
    }
    if (result === null || result === undefined) return this.reject(kind, id, DECLINED);
    try {
      if (kind === "secret") {
        if (!(result instanceof Uint8Array) && typeof result !== "string") {
          return this.reject(kind, id, `handler returned ${typeof result}, not bytes`);
        }
        await this.client.provideSecret(id, result);
      } else {
        if (typeof result !== "string" || !result) {
          return this.reject(kind, id, `handler returned ${typeof result}, not an authorization code`);
        }
        await this.client.provideOAuthAuthorization(id, result, { state: (request as OAuthRequest).state });
      }
      this.provided++;
    } catch (err) {
      const error = ConnectError.from(err);
      // NOT_FOUND / FAILED_PRECONDITION: the request was closed (answered, cancelled, expired).
      if (error.code === Code.NotFound || error.code === Code.FailedPrecondition) return;
      this.onError(error);
      return this.reject(kind, id, `could not provide the answer: ${error.rawMessage}`);
    }
  }

  private async reject(kind: "secret" | "oauth", id: string, reason: string): Promise<void> {
    const text = cleanReason(reason) || "rejected";
    try {
      if (kind === "secret") await this.client.rejectSecret(id, text);
      else await this.client.rejectOAuthAuthorization(id, text);
      this.rejected++;
    } catch (error) {
      this.onError(error);
    }
  }
}
