import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  Code,
  ConnectError,
  RejectRequest,
  SecretsClient,
  crc32c,
  type RequestEvent,
  type SecretRequest,
} from "../src/index.js";
import { startServer, type TestServer } from "../testutil/server.js";

const text = (data: Uint8Array | null | undefined) => (data ? new TextDecoder().decode(data) : data);

async function rejectsWith(promise: Promise<unknown>, code: Code, message?: RegExp): Promise<ConnectError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ConnectError, `expected a ConnectError, got ${String(error)}`);
    assert.equal(error.code, code, `expected ${Code[code]}, got ${Code[error.code]}: ${error.message}`);
    if (message) assert.match(error.rawMessage, message);
    return error;
  }
  assert.fail(`expected ${Code[code]}, but the call succeeded`);
}

describe("SecretsClient against the real server", () => {
  let server: TestServer;
  const clients: SecretsClient[] = [];
  const client = (identity: string, options: ConstructorParameters<typeof SecretsClient>[0] = {}) => {
    const c = new SecretsClient({ baseUrl: server.baseUrl, token: server.token(identity), ...options });
    clients.push(c);
    return c;
  };

  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await server?.stop();
  });

  test("crc32c matches the Castagnoli check value", () => {
    assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283);
    assert.equal(crc32c(new Uint8Array()), 0);
  });

  test("set / get / exists / list / delete", async () => {
    const alice = client("alice");
    const info = await alice.setSecret({ secretId: "db", type: "text/plain", name: "database", data: "postgres://x" });
    assert.equal(info.id, "db");
    assert.equal(info.type, "text/plain");
    assert.equal(info.size, 12n);
    assert.equal(await alice.exists("db"), true);

    const content = await alice.getSecret("db");
    assert.ok(content);
    assert.equal(text(content.data), "postgres://x");
    assert.equal(content.mimeType, "text/plain");
    assert.equal(content.name, "database");
    assert.equal(content.info.etag, info.etag);

    const bytes = new Uint8Array([0, 1, 2, 255]);
    const byName = await alice.setSecret({ type: "application/octet-stream", name: "blob", data: bytes });
    assert.ok(byName.id, "the server assigns an id");
    assert.deepEqual((await alice.getSecret({ type: "application/octet-stream", name: "blob" }))?.data, bytes);

    const ids = (await alice.listSecrets()).map((s) => s.id).sort();
    assert.deepEqual(ids, [byName.id, "db"].sort());

    await alice.deleteSecret("db");
    assert.equal(await alice.exists("db"), false);
    assert.equal(await alice.getSecret("db"), null);
    assert.deepEqual((await alice.listSecrets()).map((s) => s.id), [byName.id]);
  });

  test("getSecret of a missing id is null", async () => {
    assert.equal(await client("carol").getSecret("no-such-secret"), null);
  });

  test("a bad token fails with UNAUTHENTICATED", async () => {
    const bad = new SecretsClient({ baseUrl: server.baseUrl, token: "not-a-jwt" });
    clients.push(bad);
    await rejectsWith(bad.listSecrets(), Code.Unauthenticated);
    await rejectsWith(bad.getSecret("db"), Code.Unauthenticated);
    const none = new SecretsClient({ baseUrl: server.baseUrl });
    clients.push(none);
    await rejectsWith(none.exists("db"), Code.Unauthenticated);
  });

  test("an empty secret id fails with INVALID_ARGUMENT", async () => {
    const dave = client("dave");
    await rejectsWith(dave.exists(""), Code.InvalidArgument);
    await rejectsWith(dave.deleteSecret(""), Code.InvalidArgument);
  });

  test("a stale etag fails with ABORTED", async () => {
    const erin = client("erin");
    const first = await erin.setSecret({ secretId: "cas", data: "v1" });
    const second = await erin.setSecret({ secretId: "cas", data: "v2", etag: first.etag });
    assert.notEqual(second.etag, first.etag);
    await rejectsWith(erin.setSecret({ secretId: "cas", data: "v3", etag: first.etag }), Code.Aborted);
    await rejectsWith(erin.deleteSecret("cas", { etag: first.etag }), Code.Aborted);
    assert.equal(text((await erin.getSecret("cas"))?.data), "v2");
  });

  test("a secretRequestHandler provides; the asker's requestSecret receives the bytes", async () => {
    const seen: SecretRequest[] = [];
    const bob = client("bob", {
      secretRequestHandler: (request) => {
        seen.push(request);
        return new Uint8Array([7, 8, 9]);
      },
    });
    await bob.start();
    const alice = client("alice");
    const data = await alice.requestSecret("bob", "https://git.example/repo.git", {
      type: "git",
      timeout: 20,
      delegateTo: "alice",
    });
    assert.deepEqual(data, new Uint8Array([7, 8, 9]));
    assert.equal(seen.length, 1);
    assert.equal(seen[0]!.url, "https://git.example/repo.git");
    assert.equal(seen[0]!.type, "git");
    assert.equal(seen[0]!.requestedBy, "alice");
    assert.equal(seen[0]!.delegateTo, "alice");

    // A string result is provided as UTF-8, and async handlers work too.
    const frank = client("frank", { secretRequestHandler: async () => "hunter2" });
    await frank.start();
    assert.equal(text(await alice.requestSecret("frank", "https://x.example", { timeout: 20 })), "hunter2");
  });

  test("a handler that throws: the asker gets PERMISSION_DENIED with the reason", async () => {
    const gina = client("gina", {
      secretRequestHandler: (request) => {
        if (request.url.includes("forbidden")) throw new RejectRequest("not for you");
        if (request.url.includes("crash")) throw new Error("boom");
        return null;
      },
    });
    await gina.start();
    const alice = client("alice");
    await rejectsWith(alice.requestSecret("gina", "https://forbidden.example", { timeout: 20 }), Code.PermissionDenied, /not for you/);
    await rejectsWith(alice.requestSecret("gina", "https://crash.example", { timeout: 20 }), Code.PermissionDenied, /handler failed: Error: boom/);
    await rejectsWith(alice.requestSecret("gina", "https://other.example", { timeout: 20 }), Code.PermissionDenied, /declined/);
  });

  test("start() without a secret handler rejects secret requests at once", async () => {
    const hank = client("hank", { oauthTokenRequestHandler: () => "code" });
    await hank.start();
    await rejectsWith(
      client("alice").requestSecret("hank", "https://x.example", { timeout: 20 }),
      Code.PermissionDenied,
      /no secret request handler/,
    );
  });

  test("start() with a bad token rejects with UNAUTHENTICATED", async () => {
    const bad = new SecretsClient({ baseUrl: server.baseUrl, token: "nope", secretRequestHandler: () => "x" });
    clients.push(bad);
    await rejectsWith(bad.start(), Code.Unauthenticated);
  });

  test("watchRequests streams ready, the request and its closing; provideSecret answers", async () => {
    const ivy = client("ivy");
    const abort = new AbortController();
    const events: RequestEvent[] = [];
    let asked: Promise<Uint8Array> | undefined;
    for await (const event of ivy.watchRequests({ signal: abort.signal })) {
      events.push(event);
      if (event.case === "ready") {
        asked = client("alice").requestSecret("ivy", "https://watch.example", { timeout: 20 });
      } else if (event.case === "secretRequest") {
        await ivy.provideSecret(event.value.requestId, "from-watch");
      } else if (event.case === "requestClosed") {
        abort.abort(); // the loop then simply ends
      }
    }
    assert.deepEqual(events.map((e) => e.case), ["ready", "secretRequest", "requestClosed"]);
    assert.equal(text(await asked!), "from-watch");
    // The provided value is stored as ivy's secret, looked up by (url, type) for deletion.
    await ivy.deleteRequestedSecret("https://watch.example", "application/octet-stream");
    await rejectsWith(ivy.rejectSecret("no-such-request", "x"), Code.NotFound);
  });

  test("getOfflineOAuthToken is null when no token is stored", async () => {
    const token = await client("jack").getOfflineOAuthToken({
      oauth: {
        clientId: "cid",
        authorizationEndpoint: "https://auth.example/authorize",
        tokenEndpoint: "https://auth.example/token",
        scopes: ["read"],
      },
    });
    assert.equal(token, null);
  });
});
